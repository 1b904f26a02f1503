"""Which checkpoint, config, device and dtype a run uses, and the loaded model with what scripts need of it."""
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import REPO_ROOT, CheckpointError, load_model
from ldm.cpu import cpu_bf16_support
from ldm.diffusers_folder import find_in_hub_cache, hashed_file, looks_like_hub_id, model_name
from ldm.placement import CheckpointChanged, CheckpointFile, OneComponentAtATime, libc, resolve_dtype
from ldm.generate import int8
from ldm.generate.errors import UserError
from ldm.generate.output import model_hash
from ldm.modules.embeddings import EmbeddingError, load_embeddings
from ldm.vae_file import read_vae, resolve_vae

SD1_DEFAULT_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
EMBEDDED_MODEL = REPO_ROOT / "models" / "ldm" / "shapes-ldm" / "model.ckpt"

# What each model family is called, and the scripts that use it.
MODEL_KINDS = {
    "LatentInpaintDiffusion": ("inpainting", "scripts/inpaint.py"),
    "LatentUpscaleDiffusion": ("x4 upscaling", "scripts/upscale.py"),
    "LatentDepth2ImageDiffusion": ("depth-to-image", "scripts/depth2img.py"),
    "ImageEmbeddingConditionedLatentDiffusion": ("image variations", "scripts/variations.py"),
}
TEXT_TO_IMAGE = ("text-to-image", "scripts/txt2img.py, img2img.py or inpaint.py")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available: use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda") from None


def physical_cores() -> int:
    """The physical cores this process may run on.

    Hyper-threads of one core share its vector units, so for matmul- and convolution-bound work more
    threads than cores only add synchronisation.
    """
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text(), topology.joinpath("core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


def use_physical_cores() -> int:
    """Run torch's CPU work on one thread per physical core, unless OMP_NUM_THREADS says otherwise."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(physical_cores())
    return torch.get_num_threads()


BF16_WARNINGS = {
    "emulated": "warning: this CPU has AVX-512 but no bf16 arithmetic (AVX512_BF16 or AMX), so --precision bf16 "
                "runs 2-3x slower than fp32 here: use --precision full",
    "none": "warning: this CPU has no bf16 arithmetic (AVX-512 or AMX), so --precision bf16 runs 10-100x slower "
            "than fp32 here: use --precision full",
}


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc keep freed memory for the next allocation instead of handing it back to the kernel.

    By default every block over 32 MB (a 512×512 UNet's and VAE's activations) is mapped and unmapped
    afresh, so each sampling step page-faults and zero-fills gigabytes again: ~9 % of a step here. With
    no mmapped blocks and no trimming, the next step reuses the heap the last one freed. The cost: memory
    freed once stays with the process (SD 1.x at 256²: 4.6 instead of 4.3 GB resident after VAE decodes,
    then flat). glibc only (elsewhere nothing changes); returns whether it applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(libc().mallopt(M_MMAP_MAX, 0)) and bool(libc().mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resolve_checkpoint(ckpt: str | None, log=print) -> Path:
    """--ckpt as given (a file, a diffusers folder, or a hub id found in the local Hugging Face cache); without
    it the SD 1.x default path, or our embedded model when that holds nothing."""
    if ckpt and looks_like_hub_id(ckpt):
        try:
            snapshot = find_in_hub_cache(ckpt)
        except CheckpointError as error:
            raise UserError(str(error)) from None
        log(f"{ckpt}: the diffusers folder {snapshot} in the local Hugging Face cache")
        return snapshot
    if ckpt:
        return Path(ckpt)
    if SD1_DEFAULT_CKPT.is_file():
        return SD1_DEFAULT_CKPT
    if not EMBEDDED_MODEL.is_file():
        raise UserError(f"no --ckpt given, nothing at {SD1_DEFAULT_CKPT}, and the embedded model "
                        f"{EMBEDDED_MODEL} is missing: pass --ckpt PATH")
    log(f"no checkpoint at {SD1_DEFAULT_CKPT}: using the embedded model {EMBEDDED_MODEL.relative_to(REPO_ROOT)}")
    return EMBEDDED_MODEL


@dataclass
class LoadedModel:
    """The model of a run with what scripts need of it. checkpoint: the file as loaded (None for a model
    built in memory); components: low-memory mode's converter of one component at a time (None otherwise);
    vae_path: the VAE file whose weights replaced the checkpoint's autoencoder (None: the checkpoint's own)."""
    model: torch.nn.Module
    config: object
    ckpt_path: Path
    device: torch.device
    dtype: torch.dtype
    latent_channels: int
    downsampling_factor: int
    native_size: int
    checkpoint: CheckpointFile | None = None
    components: OneComponentAtATime | None = None
    vae_path: Path | None = None
    embeddings: object = None  # ldm.modules.embeddings.EmbeddingDatabase: textual inversion, None for none
    quantized: str | None = None  # "int8" when --precision int8 put the UNet on int8 kernels (ldm.generate.int8)
    _hash: str | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        if self.ckpt_path.is_dir():
            return model_name(self.ckpt_path)
        return self.ckpt_path.stem if self.ckpt_path.stem != "model" else self.ckpt_path.parent.name

    @property
    def hash(self) -> str:
        """A1111's "Model hash" of the checkpoint as loaded: `load` computes it at once, and a file that has
        changed since it was loaded is refused rather than hashed."""
        if self._hash is None:
            with changed_file_as_user_error():
                if self.checkpoint is not None:
                    self.checkpoint.ensure_unchanged(at_path=True)
                digest = model_hash(hashed_file(self.ckpt_path))
                if self.checkpoint is not None:
                    self.checkpoint.ensure_unchanged(at_path=True)
            self._hash = digest
        return self._hash

    @property
    def vae_hash(self) -> str | None:
        """A1111's "VAE hash": as the Model hash, the first 10 hex digits of the VAE file's sha256."""
        return model_hash(self.vae_path) if self.vae_path is not None else None

    @property
    def watermark_text(self) -> str | None:
        """What the originals embed: "SDV2" for SD 2.x (OpenCLIP), "StableDiffusionV1" for SD 1.x (CLIP)."""
        encoder = type(self.model.cond_stage_model).__name__
        return {"FrozenOpenCLIPEmbedder": "SDV2", "FrozenCLIPEmbedder": "StableDiffusionV1"}.get(encoder)

    @property
    def kind(self) -> str:
        """One of: text-to-image, inpainting, x4 upscaling, depth-to-image, image variations."""
        return MODEL_KINDS.get(type(self.model).__name__, TEXT_TO_IMAGE)[0]

    def require_kind(self, script: str, *kinds: str):
        """Refuse, in one line, a checkpoint of another family than `script` works with."""
        if self.kind in kinds:
            return
        scripts = MODEL_KINDS.get(type(self.model).__name__, TEXT_TO_IMAGE)[1]
        raise UserError(f"{self.ckpt_path.name} is {_article(self.kind)} {self.kind} model, but {script} needs "
                        f"{_article(kinds[0])} {' or '.join(kinds)} model: use {scripts} with it")

    def use(self, component: str) -> torch.nn.Module:
        """The model's text encoder, UNet, autoencoder or depth estimator ("cond_stage_model", "model",
        "first_stage_model", "depth_model"), ready to run: in low-memory mode it is converted now and the
        one used before is given back, once the checkpoint file is known to be unchanged."""
        if self.components is not None:
            with changed_file_as_user_error():
                self.components.use(component)
        return getattr(self.model, component)

    def autocast(self):
        """fp16 autocast on CUDA (as the originals' --precision autocast); a no-op elsewhere."""
        enabled = self.device.type == "cuda" and self.dtype == torch.float16
        return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiox" else "a"


@contextmanager
def changed_file_as_user_error():
    try:
        yield
    except CheckpointChanged as error:
        raise UserError(str(error)) from None


def load(ckpt: str | None, config: str | None, device_name: str, precision: str, use_ema=False, log=print,
         customize=None, low_memory=False, trust_config=False, vae: str | None = None) -> LoadedModel:
    """The model for a run; `customize`, `low_memory` and `trust_config` as in ldm.checkpoint.load_model;
    vae: --vae (a VAE file, or "none"); without it, a VAE file beside the checkpoint is used (as A1111)."""
    device = resolve_device(device_name)
    dtype = resolve_dtype(precision, device)
    if device.type == "cpu":
        use_physical_cores()
        keep_freed_memory_for_reuse()
        bf16_support = cpu_bf16_support() if dtype == torch.bfloat16 else "native"
        if bf16_support in BF16_WARNINGS:
            log(BF16_WARNINGS[bf16_support])
    if precision == "int8":
        int8.check_settings(device, low_memory)  # before the seconds of loading
    ckpt_path = resolve_checkpoint(ckpt, log)
    vae_path = resolve_vae(vae, ckpt_path, log)
    try:
        vae_file = read_vae(vae_path) if vae_path is not None else None
        with changed_file_as_user_error():
            result = load_model(ckpt_path, config, device=device, dtype=dtype, use_ema=use_ema, log=log,
                                customize=customize, low_memory=low_memory, trust_config=trust_config, vae=vae_file)
    except CheckpointError as error:
        raise UserError(str(error)) from None
    model, factor = result.model, result.model.first_stage_model.downsampling_factor
    loaded = LoadedModel(model, result.config, ckpt_path, device, dtype, latent_channels=model.channels,
                         downsampling_factor=factor, native_size=model.image_size * factor,
                         checkpoint=result.checkpoint, components=result.components, vae_path=vae_path)
    if vae_path is not None:
        log(f"VAE {vae_path.name} (hash {loaded.vae_hash}) replaces the checkpoint's autoencoder")
    loaded.hash  # now, while the file is the one loaded (cached by path, size and date: free after the first time)
    if precision == "int8":
        int8.quantize_loaded(loaded, log, low_memory)
    return loaded


def load_from_args(args, log=print, customize=None) -> LoadedModel:
    """The model a script's --ckpt, --config, --device, --precision, --use_ema, --lowmem, --trust_config and
    --vae ask for, with the embeddings of --embeddings_dir that fit it."""
    loaded = load(args.ckpt, args.config, args.device, args.precision, args.use_ema, log=log, customize=customize,
                  low_memory=args.lowmem, trust_config=args.trust_config, vae=args.vae)
    try:
        loaded.embeddings = load_embeddings(args.embeddings_dir, loaded.model.cond_stage_model, log=log,
                                            skip_bad=args.skip_bad_embeddings)
    except EmbeddingError as error:
        raise UserError(str(error)) from None
    return loaded
