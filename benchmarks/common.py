"""What the benchmarks share: a random full-size SD 1.x checkpoint, diffusers' models built from it, no hub.

The checkpoint (original key layout, random weights with std 1/sqrt(fan_in)) is the one benchmarks/load.py
writes into the work folder; it is made once and reused. diffusers reads the same file through its own
single-file conversion functions, configured from the users' original YAML
(shared/reference/diffusers-offline.md), so both sides run the same weights.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import REPO_ROOT  # noqa: E402

DEFAULT_WORKDIR = Path("/tmp/ldm-bench")
SD1_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
ORIGINAL_SD1_CONFIG = REPO_ROOT.parent / "shared" / "reference" / "original-configs" / "compvis-v1-inference.yaml"
LATENT_SCALE = 0.18215
# DDIM as the originals run it (diffusers-offline.md).
ORIGINAL_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                     prediction_type="epsilon")


# --- process settings and timing -----------------------------------------------------------------------------
def use_our_process_settings() -> str:
    """What our scripts set on a CPU (threads = physical cores, glibc keeping freed memory), said in a line."""
    from ldm.generate.loading import keep_freed_memory_for_reuse, use_physical_cores

    threads, reuse = use_physical_cores(), keep_freed_memory_for_reuse()
    return f"torch {torch.__version__}, {threads} threads, freed memory kept for reuse: {reuse}"


def parse_with_children(parser, ways, child):
    """The arguments of a benchmark that runs each way in a child process of its own (the hidden --child WAY
    --size N): in a child, child(args) runs and None is returned; in the parent, our process settings are said."""
    parser.add_argument("--child", choices=ways, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return None
    print(use_our_process_settings(), flush=True)
    return args


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def alternate(functions: dict, repeats: int) -> dict:
    """Median seconds of each function, after one warm-up call each, the calls alternating."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(seconds(function))
    return {name: statistics.median(values) for name, values in times.items()}


# --- the checkpoint (benchmarks/load.py writes it once; reused here) --------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), as load.py measures it."""
    from load import peak_rss_bytes as load_peak_rss_bytes

    return load_peak_rss_bytes()


def sd1_checkpoint(workdir: Path = DEFAULT_WORKDIR, dtype: str = "fp32", file_format: str = "ckpt") -> Path:
    """A random full-size SD 1.x checkpoint in workdir ("fp32" 4.3 GB, "fp16" 2.1 GB), written once by load.py."""
    from load import checkpoint_path, write_checkpoints

    path = checkpoint_path(Path(workdir), file_format, dtype)
    if not path.is_file():
        Path(workdir).mkdir(parents=True, exist_ok=True)
        write_checkpoints(Path(workdir))
    return path


def read_original_checkpoint(path: Path) -> dict:
    """The state dict as diffusers' users read it, memory-mapped."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]


# --- diffusers' side ------------------------------------------------------------------------------------------
def _original_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ORIGINAL_SD1_CONFIG), resolve=True)


def diffusers_unet(checkpoint: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(_original_config(), checkpoint)
    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def diffusers_vae(checkpoint: dict):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(_original_config(), checkpoint)
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def diffusers_text_encoder(checkpoint: dict):
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import VIT_L_14_TEXT_CONFIG

    with init_empty_weights():
        encoder = CLIPTextModel(CLIPTextConfig(**VIT_L_14_TEXT_CONFIG))
    weights = convert_ldm_clip_checkpoint(checkpoint)
    expected = encoder.state_dict()
    if not any(key.startswith("text_model.") for key in expected):  # transformers >= 5.6 dropped that level
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    weights = {key: value for key, value in weights.items() if key in expected}  # the legacy position_ids
    encoder.load_state_dict(weights, strict=False, assign=True)
    for name, buffer in list(encoder.named_buffers()):  # non-persistent buffers left on meta
        if buffer.device.type == "meta" and name.endswith("position_ids"):
            module = encoder.get_submodule(name.rsplit(".", 1)[0])
            module.register_buffer("position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    leftover = [name for name, p in encoder.state_dict().items() if p.device.type == "meta"]
    assert not leftover, f"text encoder weights missing: {leftover[:3]}"
    return encoder.eval().requires_grad_(False)


def clip_tokenizer(workdir: Path = DEFAULT_WORKDIR):
    """transformers' CLIPTokenizer with our BPE vocabulary (the same ids), from the files load.py writes."""
    from load import diffusers_config_dir, write_diffusers_configs
    from transformers import CLIPTokenizer

    write_diffusers_configs(Path(workdir))
    # The saved files carry no length limit; SD's is CLIP's 77 tokens.
    return CLIPTokenizer.from_pretrained(diffusers_config_dir(Path(workdir)) / "tokenizer", local_files_only=True,
                                         model_max_length=77)


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**ORIGINAL_DDIM)
