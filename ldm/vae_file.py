"""VAE files (A1111's --vae): autoencoder weights that replace a checkpoint's `first_stage_model.*`.

A VAE file is a .safetensors file or a .pt/.ckpt pickle (read with weights_only, as checkpoints are), flat
or under `state_dict`, its keys with or without the `first_stage_model.` prefix. As A1111 (sd_vae.py),
training leftovers (`loss.*`, `model_ema.*`) are dropped. Diffusers-layout VAE files
(`encoder.down_blocks.*`) are refused with a line that says so: they need converting first. TAESD's
files (`--vae taesd`, ldm.taesd_file) are read here too and replace the whole first stage.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, all_finite, read_checkpoint
from ldm.models.taesd import looks_tiny

PREFIX = "first_stage_model."
IGNORED_PREFIXES = ("loss.", "model_ema.")
# As A1111's find_vae_near_checkpoint: <checkpoint without its suffix>.vae.pt / .vae.ckpt / .vae.safetensors
BESIDE_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")
NO_VAE = "none"  # --vae none: keep the checkpoint's own autoencoder, even with a VAE file beside it


@dataclass
class VaeFile:
    path: Path
    tensors: dict  # the autoencoder's keys, without the prefix; copies in memory, not views of the file

    @property
    def name(self) -> str:
        """A1111's "VAE" infotext field: the file name."""
        return self.path.name

    def first_stage_for(self, model: nn.Module) -> nn.Module:
        """The module that holds this file's weights in `model`: its own autoencoder (TAESD's replaces it)."""
        return model.first_stage_model

    def replace_in(self, state_dict: dict, autoencoder: nn.Module) -> dict:
        """`state_dict` with its autoencoder weights replaced by this file's, which must fit `autoencoder`
        (a model built on the meta device will do) key for key and shape for shape."""
        self.check_fits({key: tuple(tensor.shape) for key, tensor in autoencoder.state_dict().items()})
        replaced = {key: value for key, value in state_dict.items() if not key.startswith(PREFIX)}
        replaced.update({PREFIX + key: tensor for key, tensor in self.tensors.items()})
        return replaced

    def check_fits(self, expected: dict) -> None:
        """Refuse, in one line, a file whose keys or shapes differ from `expected` ({key: shape}, no prefix)."""
        missing = [key for key in expected if key not in self.tensors]
        unexpected = [key for key in self.tensors if key not in expected]
        wrong_shape = [key for key in expected if key in self.tensors
                       and tuple(self.tensors[key].shape) != tuple(expected[key])]
        if missing or unexpected or wrong_shape:
            problems = [f"{len(keys)} {label} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                        for label, keys in (("missing", missing), ("unexpected", unexpected),
                                            ("wrong shape", wrong_shape)) if keys]
            raise CheckpointError(f"VAE file {self.path} does not fit this checkpoint's autoencoder: "
                                  f"{'; '.join(problems)}: use a VAE made for this model family, or --vae none")


def read_vae(path) -> VaeFile:
    """The VAE file at `path`, its keys without the prefix, checked for NaN and infinite values."""
    from ldm import taesd_file  # it builds on VaeFile

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(taesd_file.missing_tiny_message(path) or f"VAE file not found: {path} (pass --vae with "
                              "the path of a .pt, .ckpt or .safetensors VAE, taesd, or --vae none)")
    state_dict, _ = read_checkpoint(path)
    if looks_tiny(state_dict):
        return taesd_file.read_tiny(path, state_dict)
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in state_dict):
        raise CheckpointError(f"VAE file {path} is in the diffusers layout (encoder.down_blocks...), which is not "
                              "read here: use the original-layout file (e.g. vae-ft-mse-840000-ema-pruned)")
    has_prefix = any(key.startswith(PREFIX) for key in state_dict)
    tensors = {}
    for key, tensor in state_dict.items():
        if has_prefix:
            if not key.startswith(PREFIX):
                continue  # a whole checkpoint given as a VAE: its autoencoder is what is asked for
            key = key[len(PREFIX):]
        if key.startswith(IGNORED_PREFIXES):
            continue
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"VAE file {path} holds NaN or infinite values in tensor {key}: the weights are "
                                  "damaged; use another VAE file")
        # a copy: no weight stays a view of a file that may change under its memory map
        tensors[key] = tensor.clone(memory_format=torch.contiguous_format)
    if not tensors:
        raise CheckpointError(f"VAE file {path} holds no autoencoder weights: pass a VAE file to --vae")
    return VaeFile(path, tensors)


def vae_beside(ckpt_path) -> Path | None:
    """A1111's VAE next to a checkpoint: model.vae.pt (then .vae.ckpt, .vae.safetensors) for model.ckpt."""
    stem = Path(ckpt_path).with_suffix("")
    for suffix in BESIDE_SUFFIXES:
        candidate = stem.parent / (stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def resolve_vae(vae_option: str | None, ckpt_path, log=print) -> Path | None:
    """The VAE file a run uses: --vae PATH; else one beside the checkpoint (said in a line); --vae none: none."""
    from ldm.taesd_file import resolve_tiny  # it builds on VaeFile

    if vae_option is not None:
        return None if vae_option.lower() == NO_VAE else resolve_tiny(vae_option, ckpt_path) or Path(vae_option)
    beside = vae_beside(ckpt_path)
    if beside is not None:
        log(f"using the VAE beside the checkpoint: {beside} (--vae none to keep the checkpoint's own)")
    return beside
