"""One of our (original-layout) checkpoints written as a diffusers pipeline folder, which diffusers'
`from_pretrained` loads: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (and the x4
upscaler's low_res_scheduler/).

The keys are renamed as diffusers' own conversion renames them (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), and each renaming
is checked against ldm.diffusers_folder's inverse, so that loading the folder here gives the checkpoint back
bit for bit. The checkpoint is memory-mapped and every tensor written is a view of it (OpenCLIP's in_proj
cut into q, k, v; the VAE attention's 1×1 kernels as linear weights), streamed one at a time into the
files; the folder is written under a temporary name beside `out` and renamed when complete.

The configs come from our YAML (the UNet's and VAE's as diffusers' create_*_diffusers_config_from_ldm
derive them), the tokenizer files from our CLIP vocabulary. A depth model's folder has no depth estimator
(ours is MiDaS, diffusers' a transformers DPT): diffusers loads it with `depth_estimator=None,
feature_extractor=None` (then every call passes a depth_map) or with a DPT passed as depth_estimator.
"""
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from ldm.checkpoint import CONFIG_DIR, CheckpointError, find_config, parameters_on_meta, read_checkpoint
from ldm.converting import ConvertError, write_safetensors
from ldm.diffusers_folder import (CLIP_PREFIX, OPENCLIP_BLOCK, OPENCLIP_PREFIX, OPENCLIP_TOP_LEVEL, UNET_PREFIX,
                                  UNET_RESNET, UNET_TOP_LEVEL, VAE_ATTENTION, VAE_PREFIX, VAE_RESNET, _rename_first,
                                  clip_to_original, openclip_to_original, unet_to_original, vae_to_original)
from ldm.modules.encoders.tokenizer import END_TOKEN, START_TOKEN, get_tokenizer
from ldm.util import ConfigError, check_config_targets, instantiate_from_config, read_config

TEXT_ENCODERS = {"FrozenCLIPEmbedder": "clip", "FrozenOpenCLIPEmbedder": "openclip"}
PIPELINES = {  # our model class -> diffusers' pipeline
    "LatentDiffusion": "StableDiffusionPipeline",
    "LatentInpaintDiffusion": "StableDiffusionInpaintPipeline",
    "LatentDepth2ImageDiffusion": "StableDiffusionDepth2ImgPipeline",
    "LatentUpscaleDiffusion": "StableDiffusionUpscalePipeline",
}
NO_COMPONENT = [None, None]  # how model_index.json names an optional component left out
# The diffusers release whose folder layout these files follow (from_pretrained requires the field).
DIFFUSERS_LAYOUT_VERSION = {"_diffusers_version": "0.30.0"}


# --- keys: ours -> diffusers' (the reader's tables inverted; where it reads two names, the current one) ---------
def inverted(names: dict) -> dict:
    inverse = {}
    for diffusers_name, ours in names.items():
        inverse.setdefault(ours, diffusers_name)
    return inverse


RESNET_TO_DIFFUSERS = inverted(UNET_RESNET)
UNET_TO_DIFFUSERS = inverted(UNET_TOP_LEVEL)  # class_embedding (SD 2.x) before SDXL's add_embedding
ORIGINAL_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
ORIGINAL_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")


def _unet_key(key: str, per_level: int, up_levels_with_attention: set) -> str:
    for old, new in UNET_TO_DIFFUSERS.items():
        if key.startswith(old) and (old.endswith(".") or key == old):
            return new + key[len(old):]
    if match := ORIGINAL_MIDDLE.match(key):
        part, rest = int(match[1]), match[2]
        return f"mid_block.attentions.0.{rest}" if part == 1 else \
            f"mid_block.resnets.{part // 2}.{_rename_first(rest, RESNET_TO_DIFFUSERS)}"
    match = ORIGINAL_BLOCK.match(key)
    if match is None:
        raise ConvertError(f"the checkpoint's UNet holds tensor {key}, which diffusers' UNet2DConditionModel has no "
                           "place for: this model cannot be written as a diffusers folder")
    where, block, part, rest = match[1], int(match[2]), int(match[3]), match[4]
    if where == "input_blocks":
        level, index = divmod(block - 1, per_level)
        if index == per_level - 1:  # the level's last block: its downsampler
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        prefix = f"down_blocks.{level}"
    else:
        level, index = divmod(block, per_level)
        prefix = f"up_blocks.{level}"
        if part == 2 or (part == 1 and level not in up_levels_with_attention):
            return f"{prefix}.upsamplers.0.{rest}"
    if part == 0:
        return f"{prefix}.resnets.{index}.{_rename_first(rest, RESNET_TO_DIFFUSERS)}"
    return f"{prefix}.attentions.{index}.{rest}"


def unet_to_diffusers(state_dict: dict, unet_params: dict) -> dict:
    """The UNet's tensors (under model.diffusion_model.) under diffusers' UNet2DConditionModel names."""
    levels = len(unet_params["channel_mult"])
    attention_levels = {level for level in range(levels) if 2 ** level in unet_params["attention_resolutions"]}
    up_levels_with_attention = {levels - 1 - level for level in attention_levels}
    per_level = unet_params["num_res_blocks"] + 1
    return {_unet_key(key.removeprefix(UNET_PREFIX), per_level, up_levels_with_attention): tensor
            for key, tensor in state_dict.items() if key.startswith(UNET_PREFIX)}


VAE_RESNET_TO_DIFFUSERS = inverted(VAE_RESNET)
VAE_ATTENTION_TO_DIFFUSERS = inverted(VAE_ATTENTION)
VAE_LEVEL = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")
VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_(\d)|attn_1)\.(.+)$")


def _vae_key(key: str, levels: int) -> str:
    if match := VAE_MID.match(key):
        part, rest = match[1], match[4]
        if match[3]:
            return f"{part}.mid_block.resnets.{int(match[3]) - 1}.{_rename_first(rest, VAE_RESNET_TO_DIFFUSERS)}"
        return f"{part}.mid_block.attentions.0.{_rename_first(rest, VAE_ATTENTION_TO_DIFFUSERS)}"
    if match := VAE_LEVEL.match(key):
        part, side, level, rest = match[1], match[2], int(match[3]), match[6]
        if side == "up":
            level = levels - 1 - level  # diffusers counts the decoder's levels from the bottom
        if match[5] is not None:
            return f"{part}.{side}_blocks.{level}.resnets.{match[5]}.{_rename_first(rest, VAE_RESNET_TO_DIFFUSERS)}"
        return f"{part}.{side}_blocks.{level}.{side}samplers.0.{rest}"
    return key.replace("norm_out.", "conv_norm_out.")


def vae_to_diffusers(state_dict: dict, levels: int) -> dict:
    """The autoencoder's tensors (under first_stage_model.) under diffusers' AutoencoderKL names; the
    mid-block attention's 1×1 kernels as the linear weights diffusers has (views)."""
    converted = {}
    for key, tensor in state_dict.items():
        if not key.startswith(VAE_PREFIX) or key.startswith(VAE_PREFIX + "loss."):
            continue
        name = _vae_key(key.removeprefix(VAE_PREFIX), levels)
        if ".mid_block.attentions." in name and name.endswith(".weight") and tensor.dim() == 4:
            tensor = tensor.view(tensor.shape[:2])
        converted[name] = tensor
    return converted


def clip_to_diffusers(state_dict: dict) -> dict:
    """SD 1.x's CLIP (under cond_stage_model.transformer.) as transformers' CLIPTextModel holds it."""
    return {key.removeprefix(CLIP_PREFIX): tensor for key, tensor in state_dict.items()
            if key.startswith(CLIP_PREFIX) and not key.endswith("position_ids")}


OPENCLIP_TO_DIFFUSERS = inverted(OPENCLIP_TOP_LEVEL)
OPENCLIP_BLOCK_TO_DIFFUSERS = inverted(OPENCLIP_BLOCK)
RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def openclip_to_diffusers(state_dict: dict, n_blocks: int) -> dict:
    """SD 2.x's OpenCLIP tower (under cond_stage_model.model.) as diffusers writes it: a CLIPTextModel of
    the `n_blocks` blocks the model runs, in_proj cut into q, k, v (views), no projection head."""
    converted = {}
    for key, tensor in state_dict.items():
        if not key.startswith(OPENCLIP_PREFIX):
            continue
        key = key.removeprefix(OPENCLIP_PREFIX)
        if key in OPENCLIP_TO_DIFFUSERS:
            converted["text_model." + OPENCLIP_TO_DIFFUSERS[key]] = tensor
        elif (match := RESBLOCK.match(key)) and int(match[1]) < n_blocks:
            layer, rest = f"text_model.encoder.layers.{match[1]}.", match[2]
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")
                for name, part in zip("qkv", tensor.chunk(3)):
                    converted[f"{layer}self_attn.{name}_proj.{kind}"] = part
            else:
                converted[layer + _rename_first(rest, OPENCLIP_BLOCK_TO_DIFFUSERS)] = tensor
    return converted


def check_inverse(converted: dict, to_original, original: dict, prefix: str, left_out, component: str) -> None:
    """The reader's inverse conversion finds every renamed tensor at its own name again, and every tensor
    of the component under `prefix` but those `left_out` is written: the folder loads here to exactly the
    checkpoint's weights."""
    back = to_original(converted)
    expected = {key for key in original if key.startswith(prefix) and not left_out(key)}
    wrong = [key for key, tensor in back.items() if key not in original or original[key].shape != tensor.shape
             or (tensor.data_ptr() != original[key].data_ptr() and not tensor.equal(original[key]))]
    if wrong or set(back) != expected:
        example = wrong[:1] or sorted(expected ^ set(back))[:1]
        raise ConvertError(f"the checkpoint's {component} does not convert to diffusers' layout and back (e.g. "
                           f"{example}): this model has no diffusers form here")


# --- configs ---------------------------------------------------------------------------------------------------
def unet_config(params: dict, image_size: int) -> dict:
    """UNet2DConditionModel's config, as create_unet_diffusers_config_from_ldm derives it (the head counts
    per level, which diffusers calls attention_head_dim)."""
    unet = params["unet_config"]["params"]
    channels = [unet["model_channels"] * mult for mult in unet["channel_mult"]]
    attention = [2 ** level in unet["attention_resolutions"] for level in range(len(channels))]
    heads = [unet["num_heads"] if unet.get("num_heads", -1) != -1 else width // unet["num_head_channels"]
             for width in channels]
    context_dim = unet.get("context_dim")
    config = {
        "_class_name": "UNet2DConditionModel", **DIFFUSERS_LAYOUT_VERSION, "sample_size": image_size, "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"], "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": unet["num_res_blocks"], "attention_head_dim": heads,
        "cross_attention_dim": context_dim if isinstance(context_dim, int) or context_dim is None else context_dim[0],
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": unet.get("transformer_depth", 1),
    }
    if "disable_self_attentions" in unet:
        config["only_cross_attention"] = list(unet["disable_self_attentions"])
    if isinstance(unet.get("num_classes"), int):
        config["num_class_embeds"] = unet["num_classes"]
    elif unet.get("num_classes") is not None:
        raise ConvertError(f"a UNet with num_classes {unet['num_classes']!r} (unCLIP, SDXL) is not written as a "
                           "diffusers folder yet")
    return config


def vae_config(params: dict, image_size: int) -> dict:
    vae = params["first_stage_config"]["params"]["ddconfig"]
    levels = len(vae["ch_mult"])
    return {"_class_name": "AutoencoderKL", **DIFFUSERS_LAYOUT_VERSION, "sample_size": image_size * 2 ** (levels - 1),
            "in_channels": vae["in_channels"], "out_channels": vae["out_ch"],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [vae["ch"] * mult for mult in vae["ch_mult"]], "latent_channels": vae["z_channels"],
            "layers_per_block": vae["num_res_blocks"], "scaling_factor": params.get("scale_factor", 0.18215)}


def text_encoder_config(encoder) -> dict:
    """transformers' CLIPTextConfig of the encoder as built (for OpenCLIP: the blocks it runs)."""
    if TEXT_ENCODERS[type(encoder).__name__] == "clip":
        config = encoder.transformer.text_model.config if hasattr(encoder.transformer.text_model, "config") \
            else encoder.transformer.config
        return {"architectures": ["CLIPTextModel"], **config.to_diff_dict(), "model_type": "clip_text_model"}
    blocks = encoder.model.transformer.resblocks
    width = encoder.model.token_embedding.embedding_dim
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": 4 * width, "num_hidden_layers": len(blocks),
            "num_attention_heads": blocks[0].attn.n_heads, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "max_position_embeddings": encoder.model.positional_embedding.shape[0],
            "vocab_size": encoder.model.token_embedding.num_embeddings, "projection_dim": width,
            "bos_token_id": START_TOKEN, "eos_token_id": END_TOKEN, "pad_token_id": 1}


def scheduler_config(params: dict, class_name: str, prediction_type: str) -> dict:
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise ConvertError("a model with another noise schedule than Stable Diffusion's (beta_schedule "
                           f"{params.get('beta_schedule')!r}) has no diffusers scheduler config here")
    config = {"_class_name": class_name, **DIFFUSERS_LAYOUT_VERSION, "beta_start": params.get("linear_start", 1e-4),
              "beta_end": params.get("linear_end", 2e-2), "beta_schedule": "scaled_linear",
              "num_train_timesteps": params.get("timesteps", 1000), "prediction_type": prediction_type,
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return {**config, "skip_prk_steps": True} if class_name == "PNDMScheduler" else config


def tokenizer_files(pad_token: int) -> dict:
    """CLIPTokenizer's files (vocab.json, merges.txt and its configs) from our vocabulary."""
    tokenizer = get_tokenizer()
    merges = sorted(tokenizer.merge_rank, key=tokenizer.merge_rank.get)
    pad = tokenizer.id_to_symbol[pad_token]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    return {"vocab.json": json.dumps({symbol: index for index, symbol in enumerate(tokenizer.id_to_symbol)},
                                     ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "special_tokens_map.json": json.dumps(special),
            "tokenizer_config.json": json.dumps({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                 "do_lower_case": True, "errors": "replace",
                                                 "add_prefix_space": False})}


def model_index(pipeline: str, scheduler: str, params: dict) -> dict:
    index = {"_class_name": pipeline, **DIFFUSERS_LAYOUT_VERSION, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler]}
    if pipeline == "StableDiffusionDepth2ImgPipeline":
        return {**index, "depth_estimator": NO_COMPONENT, "feature_extractor": NO_COMPONENT}
    index.update(safety_checker=NO_COMPONENT, feature_extractor=NO_COMPONENT)
    if pipeline == "StableDiffusionUpscalePipeline":
        return {**index, "low_res_scheduler": ["diffusers", "DDPMScheduler"], "watermarker": NO_COMPONENT,
                "max_noise_level": params["low_scale_config"]["params"]["max_noise_level"]}
    return {**index, "requires_safety_checker": False}


# --- writing the folder ----------------------------------------------------------------------------------------
def read_model(ckpt: Path, config_path) -> tuple[dict, Path, object]:
    """(the checkpoint's state dict, memory-mapped; its config; the model built on the meta device)."""
    try:
        state_dict, _ = read_checkpoint(ckpt)
        beside_or_guessed = find_config(ckpt, state_dict) if config_path is None else Path(config_path)
    except CheckpointError as error:
        raise ConvertError(str(error)) from None
    if config_path is None and beside_or_guessed == CONFIG_DIR / "v2-inference.yaml":
        raise ConvertError(f"{ckpt.name} is an SD 2.x model, and eps and v-prediction models have the same "
                           f"tensors: pass --config {CONFIG_DIR / 'v2-inference-v.yaml'} (768-v models) or "
                           f"--config {CONFIG_DIR / 'v2-inference.yaml'} (512-base)")
    try:
        config = read_config(beside_or_guessed)
        check_config_targets(config.model, "model", beside_or_guessed)
        with parameters_on_meta():
            model = instantiate_from_config(config.model, use_ema=False)
    except ConfigError as error:
        raise ConvertError(str(error)) from None
    return state_dict, beside_or_guessed, model


def folder_tensors(state_dict: dict, params: dict, model) -> dict:
    """{component: (its tensors under diffusers' names, its config)}, each renaming checked both ways."""
    encoder = model.cond_stage_model
    image_size = params["image_size"]
    unet = unet_to_diffusers(state_dict, params["unet_config"]["params"])
    check_inverse(unet, unet_to_original, state_dict, UNET_PREFIX, lambda key: False, "UNet")
    vae = vae_to_diffusers(state_dict, len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]))
    check_inverse(vae, vae_to_original, state_dict, VAE_PREFIX, lambda key: key.startswith(VAE_PREFIX + "loss."),
                  "autoencoder")
    if TEXT_ENCODERS[type(encoder).__name__] == "clip":
        text = clip_to_diffusers(state_dict)
        check_inverse(text, clip_to_original, state_dict, CLIP_PREFIX, lambda key: key.endswith("position_ids"),
                      "text encoder")
    else:
        text = openclip_to_diffusers(state_dict, len(encoder.model.transformer.resblocks))
        not_built = tuple("cond_stage_model." + key for key in encoder.unused_checkpoint_keys())
        check_inverse(text, openclip_to_original, state_dict, OPENCLIP_PREFIX, lambda key: key.startswith(not_built),
                      "text encoder")
    return {"unet": (unet, unet_config(params, image_size)), "vae": (vae, vae_config(params, image_size)),
            "text_encoder": (text, text_encoder_config(encoder))}


def check_folder_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not (overwrite and out.is_dir()):
        raise ConvertError(f"{out} exists: pass --overwrite to replace it (a folder), or choose another --out")
    if not out.parent.is_dir():
        raise ConvertError(f"the output folder {out.parent} does not exist: create it or choose another --out")


def checkpoint_to_folder(ckpt, out, config_path=None, fp16=False, overwrite=False, log=print) -> Path:
    """Our checkpoint `ckpt` (with `config_path`, else the YAML beside it, else the one its keys fit) written
    as the diffusers pipeline folder `out`."""
    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise ConvertError(f"{ckpt} is not a file: pass a .ckpt or .safetensors checkpoint")
    check_folder_output(out, overwrite)  # before reading anything
    state_dict, config_path, model = read_model(ckpt, config_path)
    pipeline = PIPELINES.get(type(model).__name__)
    encoder = getattr(model, "cond_stage_model", None)
    if pipeline is None or type(encoder).__name__ not in TEXT_ENCODERS:
        raise ConvertError(f"config {config_path.name} builds a {type(model).__name__} with a "
                           f"{type(encoder).__name__} text encoder, which has no diffusers pipeline here (SD 1.x and "
                           "2.x: txt2img, inpainting, depth, x4 upscaler)")
    wanted = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    missing = [name for name, _ in model.named_parameters() if name.startswith(wanted) and name not in state_dict]
    if missing:
        raise ConvertError(f"{ckpt.name} lacks {len(missing)} tensors of config {config_path.name} (e.g. {missing[0]})"
                           ": pass --config with the model's own YAML")
    params = OmegaConf.to_container(read_config(config_path).model.params, resolve=True)
    components = folder_tensors(state_dict, params, model)
    prediction = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
    scheduler = "DDIMScheduler" if pipeline == "StableDiffusionUpscalePipeline" else "PNDMScheduler"
    files = {"model_index.json": json.dumps(model_index(pipeline, scheduler, params), indent=2),
             "scheduler/scheduler_config.json": json.dumps(scheduler_config(params, scheduler, prediction), indent=2),
             **{f"tokenizer/{name}": text for name, text in tokenizer_files(encoder.pad_token).items()}}
    if pipeline == "StableDiffusionUpscalePipeline":
        noise = {**params["low_scale_config"]["params"]["noise_schedule_config"], "timesteps": 1000}
        low_res = {**scheduler_config(noise, "DDPMScheduler", "epsilon"), "clip_sample": True,
                   "variance_type": "fixed_small"}
        files["low_res_scheduler/scheduler_config.json"] = json.dumps(low_res, indent=2)
    publish_folder(out, overwrite, lambda folder: write_components(folder, components, files, fp16))
    log(f"wrote {out}: a {pipeline} folder ({sum(len(t) for t, _ in components.values())} tensors"
        f"{', fp16' if fp16 else ''}, config {config_path.name})")
    return out


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}


def write_components(folder: Path, components: dict, files: dict, fp16: bool) -> None:
    for name, (tensors, config) in components.items():
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        with open(folder / name / WEIGHT_FILES[name], "wb") as f:
            write_safetensors(f, tensors, fp16, metadata={"format": "pt"})
    for relative, text in files.items():
        (folder / relative).parent.mkdir(exist_ok=True)
        (folder / relative).write_text(text, encoding="utf-8")


def publish_folder(out: Path, overwrite: bool, write) -> None:
    """write(folder) into a new temporary folder beside `out`, renamed to `out` once complete (an existing
    `out` is replaced only with `overwrite`); nothing is left behind if writing fails or is interrupted."""
    temp = out.parent / f".partial-{secrets.token_hex(6)}-{out.name}"
    old = None
    try:
        temp.mkdir()
        write(temp)
        if out.exists() and overwrite:
            old = out.parent / f".replaced-{secrets.token_hex(6)}-{out.name}"
            os.rename(out, old)
        try:
            if out.exists():
                raise ConvertError(f"{out} appeared while converting: pass --overwrite to replace it, or choose "
                                   "another --out")
            os.rename(temp, out)
        except BaseException:
            if old is not None:  # the folder replaced is put back
                os.rename(old, out)
                old = None
            raise
    except OSError as error:
        raise ConvertError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
