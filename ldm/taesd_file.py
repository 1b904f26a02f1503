"""TAESD weights files for --vae: by name (`taesd`, `taesdxl`), as a file, or as a diffusers AutoencoderTiny folder.

`--vae taesd` looks for `taesd_decoder.pth` (or `.safetensors`) beside the checkpoint, in models/VAE-taesd
(where A1111 keeps them) and models/vae_approx (ComfyUI's), then for madebyollin/taesd in the local Hugging
Face cache; `taesdxl` the same for SDXL's. The encoder (`taesd_encoder.*`) is taken from beside the decoder
when it is there; without it, img2img encodes with the checkpoint's own autoencoder. The loaded model then
holds a `TinyAutoencoder` as its first stage (see `TinyVaeFile.first_stage_for`).
"""
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import REPO_ROOT, CheckpointError, all_finite, read_checkpoint
from ldm.diffusers_folder import find_in_hub_cache, looks_like_hub_id
from ldm.models.taesd import (DOWNSAMPLING_FACTOR, TinyAutoencoder, encoder_only, latent_channels_of,
                              split_tiny_state_dict)
from ldm.vae_file import PREFIX, VaeFile

TINY_NAMES = {"taesd": "madebyollin/taesd", "taesdxl": "madebyollin/taesdxl"}  # --vae NAME -> its hub id
TINY_FOLDERS = (REPO_ROOT / "models" / "VAE-taesd", REPO_ROOT / "models" / "vae_approx")
SUFFIXES = (".pth", ".safetensors")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
HOW_TO_GET = ("download taesd_decoder.pth and taesd_encoder.pth (taesdxl_* for SDXL) from "
              "https://github.com/madebyollin/taesd into models/VAE-taesd, or pass --vae PATH")


@dataclass
class TinyVaeFile(VaeFile):
    """TAESD weights: tensors keyed `decoder.N...` (and `encoder.N...`), madebyollin's layout."""
    latent_channels: int = 4

    @property
    def has_encoder(self) -> bool:
        return any(key.startswith("encoder.") for key in self.tensors)

    def first_stage_for(self, model: nn.Module) -> nn.Module:
        """The TinyAutoencoder (on the meta device, as the model is built) that replaces `model`'s first stage."""
        autoencoder = model.first_stage_model
        factor = getattr(autoencoder, "downsampling_factor", None)
        if model.channels != self.latent_channels or factor != DOWNSAMPLING_FACTOR:
            raise CheckpointError(f"TAESD file {self.path} decodes {self.latent_channels}-channel latents at 1/"
                                  f"{DOWNSAMPLING_FACTOR} of the size; this model's are {model.channels} channels "
                                  f"at 1/{factor}: use a full VAE for it, or --vae none")
        with torch.device("meta"):
            return TinyAutoencoder(model.scale_factor, self.latent_channels, with_encoder=self.has_encoder,
                                   checkpoint_encoder=None if self.has_encoder else encoder_only(autoencoder))

    def replace_in(self, state_dict: dict, autoencoder: nn.Module) -> dict:
        """As VaeFile's, keeping the checkpoint's encoder half where there is no TAESD encoder."""
        tensors = dict(self.tensors)
        if getattr(autoencoder, "checkpoint_encoder", None) is not None:
            kept = (PREFIX + "encoder.", PREFIX + "quant_conv.")
            tensors.update({"checkpoint_encoder." + key[len(PREFIX):]: value for key, value in state_dict.items()
                            if key.startswith(kept)})
        return VaeFile.replace_in(replace(self, tensors=tensors), state_dict, autoencoder)

    def check_fits(self, expected: dict) -> None:
        if "decoder.1.weight" not in expected:  # a full autoencoder's keys: merging, or an unswapped first stage
            raise CheckpointError(f"{self.path} is a TAESD file, a decoder of its own that cannot be baked into "
                                  "a checkpoint's autoencoder: use it with --vae when generating")
        VaeFile.check_fits(self, expected)


def resolve_tiny(option: str, ckpt_path) -> Path | None:
    """--vae's TAESD file when `option` names one (taesd, taesdxl, a hub id, an AutoencoderTiny folder), else
    None. A name whose files are nowhere comes back as Path(name): read_vae then says where to get them."""
    name = option.lower()
    if name in TINY_NAMES:
        for folder in (Path(ckpt_path).parent, *TINY_FOLDERS):
            for suffix in SUFFIXES:
                if (folder / f"{name}_decoder{suffix}").is_file():
                    return folder / f"{name}_decoder{suffix}"
        option = TINY_NAMES[name]
        if not looks_like_hub_id(option):
            return Path(name)
    if looks_like_hub_id(option):
        try:
            return diffusers_weights(find_in_hub_cache(option)) or Path(option)
        except CheckpointError:
            return Path(name) if name in TINY_NAMES else None
    return diffusers_weights(Path(option)) if Path(option).is_dir() else None


def diffusers_weights(folder: Path) -> Path | None:
    """The weights file of a diffusers model folder (an AutoencoderTiny's), None if it has none."""
    return next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)


def missing_tiny_message(path: Path) -> str | None:
    """The line for --vae taesd / taesdxl whose files are nowhere, None for any other missing path."""
    if path.name.lower() in TINY_NAMES and not path.exists():
        return (f"--vae {path.name}: no {path.name.lower()}_decoder.pth or .safetensors beside the checkpoint, in "
                f"{', '.join(map(_shown, TINY_FOLDERS))}, or "
                f"{TINY_NAMES[path.name.lower()]} in the Hugging Face cache: {HOW_TO_GET}")
    return None


def _shown(folder: Path) -> str:
    return str(folder.relative_to(REPO_ROOT)) if folder.is_relative_to(REPO_ROOT) else str(folder)


def encoder_beside(decoder_path: Path) -> Path | None:
    """taesd_encoder.pth (or .safetensors) beside taesd_decoder.pth."""
    if "decoder" not in decoder_path.name:
        return None
    stem = decoder_path.stem.replace("decoder", "encoder")
    candidates = [decoder_path.with_name(stem + decoder_path.suffix)]
    candidates += [decoder_path.with_name(stem + suffix) for suffix in SUFFIXES if suffix != decoder_path.suffix]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def read_tiny(path: Path, state_dict: dict) -> TinyVaeFile:
    """The TAESD file at `path` (its `state_dict` already read), with the encoder beside a lone decoder."""
    parts = _tiny_parts(path, state_dict)
    if "decoder" not in parts:
        raise CheckpointError(f"{path} is a TAESD encoder: pass its decoder (e.g. taesd_decoder.pth) to --vae; the "
                              "encoder beside it is found")
    if "encoder" not in parts and (encoder_path := encoder_beside(path)) is not None:
        encoder_parts = _tiny_parts(encoder_path, read_checkpoint(encoder_path)[0])
        if "encoder" not in encoder_parts:
            raise CheckpointError(f"{encoder_path} beside {path.name} holds no TAESD encoder: replace or remove it")
        parts["encoder"] = encoder_parts["encoder"]
    channels = {part: latent_channels_of(part, tensors) for part, tensors in parts.items()}
    if len(set(channels.values())) > 1:
        raise CheckpointError(f"the TAESD encoder and decoder of {path} have {channels['encoder']} and "
                              f"{channels['decoder']} latent channels: they belong to different models")
    tensors = {}
    for part, part_tensors in parts.items():
        for key, tensor in part_tensors.items():
            if tensor.is_floating_point() and not all_finite(tensor):
                raise CheckpointError(f"TAESD file {path} holds NaN or infinite values in {part} tensor {key}: the "
                                      f"weights are damaged; {HOW_TO_GET}")
            tensors[f"{part}.{key}"] = tensor.clone(memory_format=torch.contiguous_format)
    return TinyVaeFile(path, tensors, latent_channels=channels["decoder"])


def _tiny_parts(path: Path, state_dict: dict) -> dict:
    try:
        return split_tiny_state_dict(state_dict)
    except ValueError as error:
        raise CheckpointError(f"{path} is not a TAESD file ({error}): {HOW_TO_GET}") from None
