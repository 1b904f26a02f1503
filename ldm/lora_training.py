"""Training a LoRA or a textual-inversion embedding on a trained LatentDiffusion (`scripts/train.py --lora_rank`,
`--embedding`), exported as the files users share and this project reads back (ldm.modules.lora,
ldm.modules.embeddings).

- LoRA: the whole model is frozen; every chosen layer's weight becomes W + up @ down x alpha / rank through a
  parametrization, so the model trained is exactly the base model with the LoRA merged at weight 1. The
  layers: the UNet's attention blocks' linear layers (kohya's default), with `convolutions` also the ResBlocks'
  and samplers' convolutions (LoCon); the text encoder's attention and MLP projections (q/k/v are rows of a
  fused weight in our encoders). Exported as kohya-ss names (`lora_unet_<diffusers path>`,
  `lora_te_text_model_encoder_layers_N_...`) with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.
- Textual inversion: only K new token vectors are trained; prompts are encoded as at inference (the name's
  tokens replaced by the vectors, prompt_encoding's chunks), so the file means at inference what it meant
  in training. Exported as A1111's `.pt` (`string_to_param`) or a `.safetensors` (`emb_params`).
"""
import datetime
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn.utils import parametrize

from ldm.generate import loading
from ldm.generate.errors import UserError
from ldm.modules.embeddings import Embedding, token_vector_size
from ldm.modules.encoders.tokenizer import get_tokenizer
from ldm.modules.lora_keys import KOHYA_TEXT, KOHYA_UNET, UNET_PREFIX, Target, text_targets, unet_paths
from ldm.modules.prompt_encoding import CHUNK_LENGTH, encode_weighted, pad_chunk_lists, prompt_chunks
from ldm.safetensors_writer import PlannedTensor, StreamingWriter

LORA_TARGETS = ("unet", "text", "both")
EMBEDDING_SUFFIXES = (".pt", ".safetensors")


# --- LoRA -----------------------------------------------------------------------------------------------
class LoraFactors(nn.Module):
    """One layer's trained pair (kohya's lora_down [rank, in, k, k], lora_up [out, rank, 1, 1]); its change
    of the weight is up @ down x alpha / rank. `up` starts at zero, so training starts from the base model."""

    def __init__(self, name: str, target: Target, weight_shape: torch.Size, rank: int, alpha: float):
        super().__init__()
        self.name, self.target, self.rank, self.alpha = name, target, rank, alpha
        rows = target.rows[1] - target.rows[0] if target.rows else weight_shape[0]
        kernel = tuple(weight_shape[2:])
        self.down = nn.Parameter(torch.empty(rank, weight_shape[1], *kernel))
        self.up = nn.Parameter(torch.zeros(rows, rank, *(1 for _ in kernel)))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # kohya's (and nn.Linear's) initialisation

    def delta(self) -> torch.Tensor:
        product = self.up.flatten(1) @ self.down.flatten(1)
        return product.view(product.shape[0], *self.down.shape[1:]) * (self.alpha / self.rank)


class LowRankUpdate(nn.Module):
    """The parametrization of one weight: the base weight plus each of its layers' changes (several for a
    fused q/k/v weight, one per block of rows)."""

    def __init__(self, factors: list):
        super().__init__()
        self.factors = nn.ModuleList(factors)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for factors in self.factors:
            rows = factors.target.rows
            if rows is None:
                weight = weight + factors.delta()
            else:
                weight = torch.cat([weight[:rows[0]], weight[rows[0]:rows[1]] + factors.delta(), weight[rows[1]:]])
        return weight


def trained_layers(model: nn.Module, targets: str, convolutions: bool = False) -> dict:
    """{kohya layer name: Target} of the layers a LoRA for `targets` (unet, text, both) trains."""
    if targets not in LORA_TARGETS:
        raise ValueError(f"targets must be one of {LORA_TARGETS}, got {targets!r}")
    chosen = {}
    if targets in ("unet", "both"):
        unet = model.model.diffusion_model
        for diffusers_path, ours in unet_paths(unet).items():
            layer = unet.get_submodule(ours)
            attention = ".attentions." in diffusers_path and isinstance(layer, nn.Linear)
            convolution = convolutions and isinstance(layer, nn.Conv2d) and (
                ".resnets." in diffusers_path or "samplers." in diffusers_path)
            if attention or convolution:
                chosen[KOHYA_UNET + diffusers_path.replace(".", "_")] = Target(UNET_PREFIX + ours)
    if targets in ("text", "both"):
        encoder_layers = text_targets(model.cond_stage_model)
        if not encoder_layers:
            raise UserError(f"--lora_targets {targets}: this model's text encoder "
                            f"({type(model.cond_stage_model).__name__}) has no layers a LoRA can name; use unet")
        chosen.update({KOHYA_TEXT + path.replace(".", "_"): target for path, target in encoder_layers.items()})
    return chosen


def add_lora(model: nn.Module, layers: dict, rank: int, alpha: float) -> list:
    """Freeze `model` and parametrize the weights of `layers` (trained_layers); returns the LoraFactors."""
    model.requires_grad_(False)
    by_parameter = {}
    for name, target in layers.items():
        by_parameter.setdefault(target.parameter_name, []).append((name, target))
    all_factors = []
    for parameter_name, named in by_parameter.items():
        module_path, _, parameter = parameter_name.rpartition(".")
        module = model.get_submodule(module_path)
        shape = getattr(module, parameter).shape
        factors = [LoraFactors(name, target, shape, rank, alpha) for name, target in named]
        parametrize.register_parametrization(module, parameter, LowRankUpdate(factors))
        all_factors += factors
    return all_factors


def remove_lora(model: nn.Module) -> None:
    """Take every parametrization out, leaving the base weights as they were (not the merged ones)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for parameter in list(module.parametrizations):
                parametrize.remove_parametrizations(module, parameter, leave_parametrized=False)


def lora_state_dict(factors: list) -> dict:
    """The kohya-ss tensors of trained factors (fp32, so that the file merges to the trained weights)."""
    state_dict = {}
    for layer in factors:
        state_dict[f"{layer.name}.lora_down.weight"] = layer.down.detach().float().contiguous()
        state_dict[f"{layer.name}.lora_up.weight"] = layer.up.detach().float().contiguous()
        state_dict[f"{layer.name}.alpha"] = torch.tensor(float(layer.alpha))
    return state_dict


def write_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Written beside `path` and renamed over it: a failed write leaves the previous file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{path.name}")
    try:
        with open(partial, "wb") as f:
            writer = StreamingWriter(f, [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()],
                                     metadata)
            for entry in writer.order:
                writer.write(entry.name, tensors[entry.name])
            writer.finish()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export_lora(factors: list, path, targets: str, steps: int) -> Path:
    path = Path(path)
    first = factors[0]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
                "ss_network_alpha": f"{first.alpha:g}", "ss_output_name": path.stem, "ss_steps": str(steps),
                "ss_network_train_on": targets}
    write_safetensors(lora_state_dict(factors), path, metadata)
    return path


# --- textual inversion ----------------------------------------------------------------------------------
class TrainedEmbedding:
    """The embedding being trained, found in prompts as the embedding database finds a file's
    (prompt_encoding's FindEmbedding protocol)."""

    def __init__(self, name: str, vectors: nn.Parameter):
        self.ids = get_tokenizer().encode(name)
        if not self.ids:
            raise UserError(f"--embedding {name!r} has no tokens to write in a prompt: use a word such as lilac")
        self.embedding = Embedding(name, vectors, Path(name), sha256="")

    def find_embedding(self, token_ids: list, position: int):
        if token_ids[position:position + len(self.ids)] == self.ids:
            return self.embedding, self.embedding.n_vectors, len(self.ids)
        return None


def initial_vectors(encoder: nn.Module, init_word: str, count: int) -> torch.Tensor:
    """`count` vectors: the token embeddings of `init_word`'s tokens, repeated as needed (A1111's init text)."""
    ids = get_tokenizer().encode(init_word)
    if not ids:
        raise UserError(f"--init_word {init_word!r} has no tokens: give a word close to the concept, e.g. purple")
    table = encoder.token_embedding_module().weight.detach()
    return torch.stack([table[ids[index % len(ids)]] for index in range(count)]).float().clone()


def encode_with_embedding(encoder: nn.Module, texts: list, embedding: TrainedEmbedding) -> torch.Tensor:
    """Conditioning of `texts` as the generation scripts' Conditioner encodes them, with gradients."""
    chunk_length = min(CHUNK_LENGTH, encoder.max_length - 2)
    chunk_lists = [prompt_chunks(text, encoder.pad_token, chunk_length=chunk_length,
                                 find_embedding=embedding.find_embedding)[0] for text in texts]
    return encode_weighted(encoder.encode_tokens, pad_chunk_lists(chunk_lists, encoder.pad_token, chunk_length))


def export_embedding(embedding: Embedding, path, steps: int) -> Path:
    """A1111's .pt (`string_to_param`, read with weights_only) or a .safetensors with `emb_params`."""
    path = Path(path)
    vectors = embedding.vectors.detach().float().cpu().contiguous().clone()
    if path.suffix == ".safetensors":
        write_safetensors({"emb_params": vectors}, path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{path.name}")
    try:
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": embedding.name,
                    "step": steps, "sd_checkpoint": None, "sd_checkpoint_name": None}, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# --- the training -------------------------------------------------------------------------------------
class AdapterTraining(nn.Module):
    """What TrainingWrapper trains: the frozen model's denoising loss, through `condition` (captions ->
    conditioning, with gradients even where the model's config freezes its text encoder), over `trained`."""

    def __init__(self, model: nn.Module, trained: list, condition):
        super().__init__()
        self.model, self.trained, self.condition = model, list(trained), condition
        self.extra = nn.ParameterList([p for p in self.trained if not any(p is q for q in model.parameters())])

    def trainable_parameters(self) -> list:
        return self.trained

    def training_loss(self, batch):
        model = self.model
        batch = model.drop_conditioning(batch)
        with torch.no_grad():
            z = model.get_first_stage_encoding(model.encode_first_stage(model.get_input(batch, model.first_stage_key)))
        c = self.condition(batch[model.cond_stage_key])
        t = torch.randint(0, model.num_timesteps, (z.shape[0],), device=z.device)
        return model.p_losses(z, c, t)


def check_adapter_options(options) -> str:
    """Refuse impossible combinations in one line each; returns "lora" or "embedding"."""
    if options.lora_rank is None and options.embedding is None:
        raise UserError("--base_ckpt is for training a LoRA or an embedding on it: give --lora_rank R or --embedding NAME")
    if options.lora_rank is not None and options.embedding is not None:
        raise UserError("--lora_rank and --embedding train different things: give one of them")
    if options.resume:
        raise UserError("--resume continues a full training run; a LoRA or embedding run starts from --base_ckpt")
    if not options.base_ckpt:
        raise UserError("a LoRA or embedding is trained on a trained model: give --base_ckpt CHECKPOINT")
    if not options.base:
        raise UserError("give --base CONFIG for the data section (e.g. configs/latent-diffusion/shapes-ldm.yaml)")
    if options.lora_rank is not None:
        if options.lora_rank < 1:
            raise UserError(f"--lora_rank must be at least 1 (got {options.lora_rank})")
        if options.export and Path(options.export).suffix != ".safetensors":
            raise UserError(f"--export {options.export}: a LoRA is written as .safetensors; use a name ending in it")
        return "lora"
    if options.embedding_vectors < 1:
        raise UserError(f"--embedding_vectors must be at least 1 (got {options.embedding_vectors})")
    if options.export:
        export = Path(options.export)
        if export.suffix not in EMBEDDING_SUFFIXES or export.stem != options.embedding:
            raise UserError(f"--export {options.export}: an embedding is used by its file's name; write it as "
                            f"{options.embedding}.pt or {options.embedding}.safetensors")
    return "embedding"


def train_adapter(options):
    """`scripts/train.py --lora_rank ...` or `--embedding ...`: returns (log dir, trainer)."""
    from ldm.training import (ProgressPrinter, RunFolder, TrainingWrapper, build_from_config, load_configs, say,
                              training_strategy)

    kind = check_adapter_options(options)
    config = load_configs(options.base, options.overrides)
    data_config = config.data
    if options.batch_size:
        data_config.params.batch_size = options.batch_size
    if options.num_workers is not None:
        data_config.params.num_workers = options.num_workers
    pl.seed_everything(options.seed, workers=True, verbose=False)
    if options.threads:
        torch.set_num_threads(options.threads)
    model = loading.load(options.base_ckpt, None, "cpu", "full", trust_config=options.trust_config).model
    model.requires_grad_(False)
    model.use_ema = False  # the factors are what is trained; no copy of the base weights is averaged
    encoder = model.cond_stage_model
    if kind == "lora":
        alpha = options.lora_alpha if options.lora_alpha is not None else float(options.lora_rank)
        factors = add_lora(model, trained_layers(model, options.lora_targets, options.lora_convolutions),
                           options.lora_rank, alpha)
        trained = [p for layer in factors for p in (layer.down, layer.up)]
        adapter = AdapterTraining(model, trained, model.get_learned_conditioning)
        name = options.name or f"lora-{options.lora_targets}-r{options.lora_rank}"
    else:
        vectors = nn.Parameter(initial_vectors(encoder, options.init_word, options.embedding_vectors))
        if vectors.shape[1] != token_vector_size(encoder):
            raise UserError("this text encoder's token vectors cannot be trained as an embedding")
        embedding = TrainedEmbedding(options.embedding, vectors)
        adapter = AdapterTraining(model, [vectors], lambda texts: encode_with_embedding(encoder, list(texts), embedding))
        name = options.name or f"embedding-{options.embedding}"
    say(f"{kind}: {sum(p.numel() for p in adapter.trainable_parameters())} parameters trained, the model's "
        f"{sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e6:.2f} M frozen")

    lr = config.model.get("base_learning_rate", 1e-4)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    run_folder = RunFolder(Path(options.logdir) / f"{stamp}_{name}")  # rank 0's name, on every rank
    wrapper = TrainingWrapper(adapter, lr, seed=options.seed)
    datamodule = build_from_config(data_config)
    every = config.get("training", {}).get("print_every_n_steps", 50)
    trainer = pl.Trainer(
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes,
        strategy=training_strategy(options.strategy),
        precision=options.precision, max_steps=options.max_steps,
        max_time=datetime.timedelta(minutes=options.max_minutes) if options.max_minutes else None,
        logger=CSVLogger(run_folder.path, name="metrics", version=stamp),
        callbacks=[run_folder, ProgressPrinter(every)], default_root_dir=run_folder.path, enable_checkpointing=False,
        log_every_n_steps=10, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(wrapper, datamodule=datamodule)
    logdir = run_folder.path
    say(f"trained to step {trainer.global_step} in {(time.perf_counter() - started) / 60:.1f} min; log dir {logdir}")
    if not trainer.is_global_zero:
        return logdir, trainer
    if kind == "lora":
        paths = [export_lora(factors, logdir / f"{name}.safetensors", options.lora_targets, trainer.global_step)]
        if options.export:
            paths.append(export_lora(factors, options.export, options.lora_targets, trainer.global_step))
    else:
        paths = [export_embedding(embedding.embedding, logdir / f"{options.embedding}.pt", trainer.global_step)]
        if options.export:
            paths.append(export_embedding(embedding.embedding, options.export, trainer.global_step))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return logdir, trainer
