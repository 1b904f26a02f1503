"""Training any of our models with PyTorch Lightning (the role of the original `main.py`).

The model classes are plain nn.Modules so that inference never imports Lightning; here they are wrapped:

- `TrainingWrapper`: training_step -> `model.training_loss(batch)`, AdamW over the model's trainable
  parameters, optional `LambdaLinearScheduler` warm-up, EMA update after every batch. Checkpoints are
  written in the original format, `{"state_dict": <the model's own keys>, "global_step": N, ...}`
  (Lightning's optimizer and loop state ride along, so `--resume` continues exactly).
- `DataModuleFromConfig`: the config's `data:` section (batch_size, num_workers, train dataset).
- `SampleGridLogger`: every N steps a PNG grid (samples, or reconstructions for an autoencoder) with
  its captions in a text file beside it.
- `train(...)`: everything `scripts/train.py` does: configs, log dir, resume, fit, export.

Several processes (Lightning's DDP, launched by Lightning itself or by torchrun): rank 0 names the log dir and
writes every file; the logged metrics are means over all ranks; each rank trains on its own share of the data
(a DistributedSampler that drops the remainder, so that no sample is seen twice in an epoch) with noise of its own.

A training config is a model config plus two optional sections:

    data:      {target: ldm.training.DataModuleFromConfig, params: {batch_size, num_workers, train: {...}}}
    training:  first_stage_ckpt (autoencoder weights for a LatentDiffusion), base_ckpt (a ControlLDM's trained
               base model), sample_every_n_steps,
               sample_prompts, guidance_scale, sample_steps, checkpoint_every_n_steps, log_every_n_steps
"""
import datetime
import inspect
import math
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only
from torch.nn.parallel import DistributedDataParallel

from ldm.checkpoint import CheckpointError, read_checkpoint
from ldm.generate.errors import UserError
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.generate.rng import CpuRandom
from ldm.models.diffusion.samplers import sample
from ldm.models.diffusion.sampling import GuidedDenoiser, placement_of
from ldm.util import (ConfigError, check_config_targets, count_params, instantiate_from_config, read_config,
                      trusted_configs)

WRAPPER_PREFIX = "model."  # the wrapper holds the model as `self.model`
LAST_CHECKPOINT = "last.ckpt"


# --- the LightningModule ------------------------------------------------------------------------------
def trainable_parameters(model):
    if hasattr(model, "trainable_parameters"):
        return model.trainable_parameters()
    return [p for p in model.parameters() if p.requires_grad]


class TrainingWrapper(pl.LightningModule):
    """Trains `model` (anything with `training_loss(batch) -> (loss, logs)`) with AdamW."""

    def __init__(self, model, learning_rate, scheduler_config=None, weight_decay=0.0, seed=None):
        super().__init__()
        # Channels-last convolution weights make oneDNN's CPU convolutions about twice as fast (measured);
        # the activations follow the weights' layout, and checkpoints are unaffected.
        self.model = model.to(memory_format=torch.channels_last)
        self.learning_rate = learning_rate
        self.scheduler_config = scheduler_config
        self.weight_decay = weight_decay
        self.seed = seed

    def on_train_start(self):
        # Every rank was seeded alike (so that all build the same model); without this they would also draw the
        # same timesteps and noise for their different images.
        if self.seed is not None and self.trainer.world_size > 1:
            seed_generators(self.seed + self.global_rank)

    def training_step(self, batch, batch_idx):
        loss, logs = self.model.training_loss(batch)
        logs = {**logs, "loss": loss.detach()}
        self.log_dict({f"train/{name}": value for name, value in logs.items()}, on_step=True, sync_dist=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        update_ema = getattr(self.model, "update_ema", None)
        if update_ema is not None:
            update_ema()

    def configure_optimizers(self):
        # foreach: one fused update over all tensors (the per-tensor default is slower on CPU).
        optimizer = torch.optim.AdamW(trainable_parameters(self.model), lr=self.learning_rate,
                                      weight_decay=self.weight_decay, foreach=True)
        if not self.scheduler_config:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # Checkpoints hold the model's own keys, as the original checkpoints do, so that every loader reads them.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {key[len(WRAPPER_PREFIX):]: value for key, value in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {WRAPPER_PREFIX + key: value for key, value in checkpoint["state_dict"].items()}


def seed_generators(seed: int) -> None:
    """Python's, numpy's and torch's generators, without touching PL_GLOBAL_SEED (the data samplers' shared seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def ema_weights(model):
    """Temporarily put the EMA weights into `model.model` (for sample grids); a no-op without EMA."""
    ema = getattr(model, "model_ema", None) if getattr(model, "use_ema", False) else None
    if ema is None:
        yield
        return
    saved = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    ema.copy_to(model.model)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                p.copy_(saved[name])


# --- data ---------------------------------------------------------------------------------------------
class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train, num_workers=1, shuffle=True):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_config = train
        self.shuffle = shuffle

    def setup(self, stage=None):
        self.train_dataset = instantiate_from_config(self.train_config)

    def train_dataloader(self):
        sampler = self.distributed_sampler()
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=self.shuffle and sampler is None, sampler=sampler,
            num_workers=self.num_workers, drop_last=True, persistent_workers=self.num_workers > 0,
            collate_fn=collate_without_attrs)

    def distributed_sampler(self):
        """Each rank's share of the data in several processes (None in one). Lightning's own sampler would pad
        the shares to equal length with repeated samples; this one drops the remainder, as the batches do."""
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2:
            return None
        # The same seed on every rank (the one seed_everything saved), so that the shares are one permutation.
        return torch.utils.data.DistributedSampler(
            self.train_dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=self.shuffle,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), drop_last=True)


def collate_without_attrs(items):
    """The default collation, less the datasets' `attrs` dicts (ground truth for evaluation, not training)."""
    return torch.utils.data.default_collate([{k: v for k, v in item.items() if k != "attrs"} for item in items])


# --- sample grids -------------------------------------------------------------------------------------
def save_grid(images: torch.Tensor, path: Path, columns: int, captions=None):
    """BCHW images in [-1, 1] as one PNG, rows of `columns`; the captions go to <path>.txt, one a line."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    count, channels, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 2), columns * (width + 2), channels), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 2) + 1, column * (width + 2) + 1
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if channels == 1 else grid).save(path)
    if captions is not None:
        path.with_suffix(".txt").write_text("".join(f"{i}: {caption}\n" for i, caption in enumerate(captions)))


@torch.no_grad()
def sample_images(model: LatentDiffusion, prompts, steps=50, guidance_scale=5.0, seed=0, eta=0.0, sampler="ddim",
                  schedule="automatic", encode=None, control=None):
    """Text-to-image with any registered sampler (ldm.models.diffusion.samplers) and schedule, and
    classifier-free guidance; BCHW in [-1, 1]. One CPU generator seeded with `seed` gives the start noise,
    then the sampler's own noise (ancestral steps, DDIM's `eta`). encode: prompts -> conditioning (default: the
    model's own; the generation scripts' Conditioner for textual-inversion embeddings). control: GuidedDenoiser's
    (ControlNet residuals for each model call)."""
    encode = encode or model.get_learned_conditioning
    cond = encode(list(prompts))
    uncond = encode([""] * len(prompts)) if guidance_scale != 1.0 else None
    noise = CpuRandom(seed)
    shape = (len(prompts), model.channels, model.image_size, model.image_size)
    x = noise.randn(shape).to(cond.device, cond.dtype)
    denoiser = GuidedDenoiser(model, cond, uncond, scale=guidance_scale, control=control, **placement_of(model))
    latents = sample(sampler, denoiser, x, steps, schedule=schedule, eta=eta, noise_source=noise)
    return model.decode_first_stage(latents)


class SampleGridLogger(pl.Callback):
    """Every `every_n_steps` (and at the end): samples of the prompts (LatentDiffusion, EMA weights) or
    reconstructions of a fixed batch (autoencoder) under <logdir>/images/step-NNNNNN.png."""

    def __init__(self, image_dir, every_n_steps, prompts=(), guidance_scale=5.0, steps=50, reconstruct=8):
        self.image_dir = Path(image_dir)
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts)
        self.guidance_scale = guidance_scale
        self.steps = steps
        self.reconstruct = reconstruct
        self.last_logged_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module, batch)

    def on_train_end(self, trainer, pl_module):
        self.log_grid(trainer, pl_module, None)

    @rank_zero_only
    def log_grid(self, trainer, pl_module, batch):
        step = trainer.global_step
        if step == self.last_logged_step:
            return
        self.last_logged_step = step
        model = pl_module.model
        was_training = model.training
        model.eval()
        path = self.image_dir / f"step-{step:06d}.png"
        try:
            if isinstance(model, LatentDiffusion) and self.prompts:
                with ema_weights(model):
                    images = sample_images(model, self.prompts, self.steps, self.guidance_scale)
                save_grid(images, path, columns=min(len(self.prompts), 8), captions=self.prompts)
            elif isinstance(model, AutoencoderKL) and batch is not None:
                with torch.no_grad():
                    inputs = model.get_input(batch)[:self.reconstruct]
                    reconstructions, _ = model(inputs, sample_posterior=False)
                save_grid(torch.cat([inputs, reconstructions]), path, columns=len(inputs),
                          captions=["top row: inputs, bottom row: reconstructions"])
        finally:
            model.train(was_training)


class RunFolder(pl.Callback):
    """The run's log dir as rank 0 named it. Each process names it at its own start time (Lightning's launcher
    starts the other ranks when training begins, torchrun all at once), so once the processes are connected
    rank 0's name is sent to all; only rank 0 creates it and saves `config` there (configs/project.yaml)."""

    def __init__(self, path, config=None):
        self.path = Path(path)
        self.config = config

    def setup(self, trainer, pl_module, stage):
        self.path = Path(trainer.strategy.broadcast(str(self.path)))
        if trainer.is_global_zero:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.config is not None:
                (self.path / "configs").mkdir(exist_ok=True)
                OmegaConf.save(self.config, self.path / "configs" / "project.yaml")


def training_strategy(strategy):
    """--strategy for the Trainer. Plain "ddp" does not broadcast buffers from rank 0 before every step: ours
    change only identically on every rank (EMA copies, as large as the model itself, and their step count)."""
    if strategy != "ddp":
        return strategy
    # Newer torch renamed the option (deprecating the old name); the new one still syncs them once at the start.
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return DDPStrategy(**{no_buffer_sync: False})


say = rank_zero_only(print)  # a line from rank 0 only (each rank runs all of the training script)


class ProgressPrinter(pl.Callback):
    """One line every `every_n_steps`: step, loss, steps/s since the last line (for logs of background runs)."""

    def __init__(self, every_n_steps):
        self.every_n_steps = every_n_steps
        self.start = self.last_time = None
        self.last_step = 0

    def on_train_start(self, trainer, pl_module):
        self.start = self.last_time = time.perf_counter()
        self.last_step = trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        loss = float(trainer.callback_metrics["train/loss"])  # the mean over all ranks, as logged
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        print(f"step {step} loss {loss:.4f} lr {lr:.3g} {rate:.2f} steps/s elapsed {(now - self.start) / 60:.1f} min",
              flush=True)
        self.last_time, self.last_step = now, step


# --- configs, the first stage, export -------------------------------------------------------------------
def load_configs(paths, dotlist=()):
    """The configs merged left to right (later files override earlier ones), then `key=value` overrides.

    Every target of every file, of the overrides and of the result is checked (ldm.util's rules) before
    anything is built; a config that cannot be read or used is a UserError naming it.
    """
    try:
        configs = [read_config(path) for path in paths]
        for path, config in zip(paths, configs):
            check_config_targets(config, source=path, resolve=False)
        overrides = parse_overrides(dotlist)
        check_config_targets(overrides, source="--set", resolve=False)
        merged = OmegaConf.merge(*configs, overrides)
        check_config_targets(merged, source=" + ".join(map(str, paths)))
    except ConfigError as error:
        raise UserError(str(error)) from None
    except OmegaConfBaseException as error:
        raise UserError(f"the configs {', '.join(map(str, paths))} and --set cannot be merged: "
                        f"{str(error).splitlines()[0]}") from None
    for section in ("model", "data"):
        if not isinstance(merged.get(section), DictConfig) or "target" not in merged[section]:
            raise UserError(f"the configs {', '.join(map(str, paths))} have no '{section}:' section with a target: "
                            "training needs a model and a data section (see configs/latent-diffusion/shapes-ldm.yaml)")
    return merged


def build_from_config(config):
    """instantiate_from_config, with the config's fault (say a misspelt parameter) as a UserError."""
    try:
        return instantiate_from_config(config)
    except ConfigError as error:
        raise UserError(str(error)) from None


def parse_overrides(dotlist) -> DictConfig:
    """--set KEY=VALUE items as one config; an item that is not KEY=VALUE is a UserError naming it."""
    parsed = []
    for item in dotlist:
        key, equals, _ = item.partition("=")
        if not equals or not all(part.strip() for part in key.split(".")):
            raise UserError(f"--set {item!r} is not KEY=VALUE (e.g. --set model.base_learning_rate=2e-4)")
        try:
            parsed.append(OmegaConf.from_dotlist([item]))
        except (yaml.YAMLError, OmegaConfBaseException) as error:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
    return OmegaConf.merge(OmegaConf.create(), *parsed)


def load_base_model(model, ckpt_path):
    """A ControlLDM's trained base model (training.base_ckpt), whose UNet also starts its control model."""
    if not hasattr(model, "load_base_model"):
        raise UserError(f"training.base_ckpt is for ControlNet configs (a ControlLDM), not a {type(model).__name__}: "
                        "continue a run with --resume, or train a LoRA or an embedding with --base_ckpt")
    try:
        state_dict, _ = read_checkpoint(ckpt_path)
        model.load_base_model(state_dict)
    except (CheckpointError, ValueError) as error:
        raise UserError(f"training.base_ckpt {ckpt_path}: {error}") from None
    say(f"base model: loaded {len(state_dict)} tensors from {ckpt_path}")


def load_first_stage(model: LatentDiffusion, ckpt_path):
    """Put trained autoencoder weights into a LatentDiffusion: from an autoencoder checkpoint (ours or an
    original one) or from the first_stage_model.* part of a latent-diffusion checkpoint."""
    try:
        state_dict, _ = read_checkpoint(ckpt_path)
    except CheckpointError as error:
        raise UserError(f"--first_stage_ckpt: {error}") from None
    prefix = "first_stage_model."
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    # The discriminator and LPIPS weights of the originals' training loss are not part of the autoencoder.
    state_dict = {key: value.float() for key, value in state_dict.items() if not key.startswith("loss.")}
    try:
        model.first_stage_model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        problem = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserError(f"--first_stage_ckpt {ckpt_path} does not fit this config's autoencoder ({problem[:200]}): "
                        "pass the checkpoint of an autoencoder trained with the same first_stage_config") from None
    say(f"first stage: loaded {len(state_dict)} tensors from {ckpt_path}")


def inference_state_dict(model) -> dict:
    """The model's weights for inference: EMA weights (when kept) in place of the raw ones, no EMA copies."""
    state_dict = model.state_dict()
    ema = getattr(model, "model_ema", None) if getattr(model, "use_ema", False) else None
    if ema is not None:
        shadows = dict(ema.named_buffers())
        for name, shadow_name in ema.shadow_names.items():
            state_dict["model." + name] = shadows[shadow_name]
    return {key: value for key, value in state_dict.items() if not key.startswith("model_ema.")}


def export_model(model, model_config, path, global_step):
    """A small fp16 checkpoint in the original format, with its config (use_ema off) beside it as <path>.yaml;
    a ControlLDM's control model alone, as ControlNet files hold it (ldm.controlnet_file.save_controlnet)."""
    path = Path(path)
    if hasattr(model, "control_model"):
        from ldm.controlnet_file import save_controlnet
        save_controlnet(model.control_model, model_config, path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        state_dict = {key: (value.half() if value.is_floating_point() else value).detach().cpu().contiguous().clone()
                      for key, value in inference_state_dict(model).items()}
        torch.save({"state_dict": state_dict, "global_step": int(global_step)}, path)
        config = OmegaConf.create({"model": OmegaConf.to_container(model_config, resolve=True)})
        if "use_ema" in config.model.get("params", {}):
            config.model.params.use_ema = False
        OmegaConf.save(config, path.with_suffix(".yaml"))
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB, step {global_step}) and {path.with_suffix('.yaml').name}")


@torch.no_grad()
def measure_latent_std(autoencoder: AutoencoderKL, dataset, count=512, batch_size=64) -> float:
    """The std of sampled latents over `count` images: a LatentDiffusion's scale_factor is its inverse
    (what the originals' scale_by_std measured on the first batch)."""
    was_training = autoencoder.training
    autoencoder.eval()
    latents = []
    for start in range(0, count, batch_size):
        batch = collate_without_attrs([dataset[i] for i in range(start, min(start + batch_size, count))])
        latents.append(autoencoder.encode(autoencoder.get_input(batch)).sample().flatten())
    autoencoder.train(was_training)
    return torch.cat(latents).std().item()


# --- a training run -----------------------------------------------------------------------------------
def resolve_resume(resume) -> tuple[Path, Path]:
    """(log dir, checkpoint) from --resume given a log dir or a checkpoint inside <logdir>/checkpoints."""
    resume = Path(resume)
    if resume.is_dir():
        logdir, checkpoint = resume, resume / "checkpoints" / LAST_CHECKPOINT
    elif resume.is_file():
        logdir, checkpoint = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent, resume
    else:
        raise UserError(f"--resume {resume}: no such checkpoint or log dir")
    if not checkpoint.is_file():
        raise UserError(f"--resume {resume}: {checkpoint} is missing: give the log dir of a run that saved a "
                        "checkpoint, or one of its checkpoints/*.ckpt")
    try:  # tensors, numbers and plain containers only: a pickle that would run code is refused here
        torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001  (any unreadable file is the same one-line answer)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--resume {resume}: {checkpoint.name} is not a training checkpoint that can be read "
                        f"safely ({reason[:160]}): give a checkpoint saved by scripts/train.py") from None
    return logdir, checkpoint


def learning_rate(config, batch_size, devices, num_nodes, scale_lr):
    """base_learning_rate from the model config; with scale_lr, times the global batch size
    (batch_size x devices x nodes), as the originals' main.py did by default."""
    base = config.model.get("base_learning_rate", 1e-4)
    if not scale_lr:
        return base
    return base * batch_size * devices * num_nodes


def device_count(devices):
    if isinstance(devices, int):
        return max(devices, 1)
    if str(devices).isdigit():
        return max(int(devices), 1)
    return 1 if devices == "auto" else len(str(devices).strip(",").split(","))


def train(options):
    """Everything `scripts/train.py` does; `options` carries its arguments (see that script's --help).

    Bad input (a config, --set, --resume, --first_stage_ckpt) is a UserError raised before the log dir
    is created. --trust_config lets the configs build any class, here and in the constructors they reach.
    """
    with trusted_configs(options.trust_config):
        if any(getattr(options, name, None) is not None for name in ("lora_rank", "embedding", "base_ckpt")):
            from ldm.lora_training import train_adapter
            return train_adapter(options)
        return _train(options)


def _train(options):
    if options.resume:
        logdir, resume_ckpt = resolve_resume(options.resume)
        saved = sorted((logdir / "configs").glob("*.yaml"))
        if not saved:
            raise UserError(f"--resume {options.resume}: {logdir / 'configs'} holds no config: give the log dir "
                            "of a run of scripts/train.py")
        bases = saved + list(options.base or [])
    else:
        if not options.base:
            raise UserError("give --base CONFIG (or --resume LOGDIR)")
        stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        name = options.name or Path(options.base[-1]).stem
        logdir, resume_ckpt = Path(options.logdir) / f"{stamp}_{name}", None
        bases = list(options.base)
    config = load_configs(bases, options.overrides)
    data_config = config.data
    if options.batch_size:
        data_config.params.batch_size = options.batch_size
    if options.num_workers is not None:
        data_config.params.num_workers = options.num_workers
    training_config = config.get("training", OmegaConf.create())
    pl.seed_everything(options.seed, workers=True, verbose=False)  # verbose: a line on stderr, where errors go
    if options.threads:
        torch.set_num_threads(options.threads)

    model = build_from_config(config.model)
    say(f"{config.model.target}: {count_params(model) / 1e6:.2f} M parameters, "
        f"{sum(p.numel() for p in trainable_parameters(model)) / 1e6:.2f} M trained")
    first_stage_ckpt = options.first_stage_ckpt or training_config.get("first_stage_ckpt")
    base_ckpt = training_config.get("base_ckpt")
    if base_ckpt and resume_ckpt is None:
        load_base_model(model, base_ckpt)
    elif isinstance(model, LatentDiffusion) and resume_ckpt is None:
        if first_stage_ckpt:
            load_first_stage(model, first_stage_ckpt)
        else:
            say("WARNING: no first_stage_ckpt: the autoencoder keeps its random weights")

    devices = device_count(options.devices)
    lr = learning_rate(config, data_config.params.batch_size, devices, options.num_nodes, options.scale_lr)
    say(f"learning rate {lr:.3g} (batch {data_config.params.batch_size} x {devices} devices x {options.num_nodes} "
        f"nodes, scale_lr={options.scale_lr})")
    wrapper = TrainingWrapper(model, lr, scheduler_config=getattr(model, "scheduler_config", None), seed=options.seed)
    datamodule = build_from_config(data_config)

    # On ranks other than 0 the paths below, named before rank 0's log dir is known, are never written to.
    run_folder = RunFolder(logdir, config if resume_ckpt is None else None)
    every = training_config.get("checkpoint_every_n_steps", 500)
    callbacks = [
        run_folder,
        pl.callbacks.ModelCheckpoint(dirpath=logdir / "checkpoints", filename="step-{step:06d}", save_last=True,
                                     every_n_train_steps=every, auto_insert_metric_name=False),
        SampleGridLogger(logdir / "images", training_config.get("sample_every_n_steps", 500),
                         prompts=training_config.get("sample_prompts", ()),
                         guidance_scale=training_config.get("guidance_scale", 5.0),
                         steps=training_config.get("sample_steps", 50)),
        ProgressPrinter(training_config.get("print_every_n_steps", 50)),
    ]
    trainer = pl.Trainer(
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes,
        strategy=training_strategy(options.strategy),
        precision=options.precision, max_steps=options.max_steps,
        max_time=datetime.timedelta(minutes=options.max_minutes) if options.max_minutes else None,
        # One metrics file per run (a resumed run gets its own): <logdir>/metrics/<start time>/metrics.csv.
        logger=CSVLogger(logdir, name="metrics", version=datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")),
        callbacks=callbacks, default_root_dir=logdir,
        log_every_n_steps=training_config.get("log_every_n_steps", 10), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(wrapper, datamodule=datamodule, ckpt_path=resume_ckpt, weights_only=True)
    minutes = (time.perf_counter() - started) / 60
    logdir = run_folder.path
    trainer.save_checkpoint(logdir / "checkpoints" / LAST_CHECKPOINT)
    say(f"trained to step {trainer.global_step} in {minutes:.1f} min; log dir {logdir}")

    if trainer.is_global_zero:
        if isinstance(model, AutoencoderKL):
            std = measure_latent_std(model, datamodule.train_dataset)
            message = f"latent std {std:.4f}: set scale_factor: {1 / std:.4f} in the latent-diffusion config"
            (logdir / "latent_std.txt").write_text(message + "\n")
            print(message)
        if options.export:
            export_model(model, config.model, options.export, trainer.global_step)
    return logdir, trainer
