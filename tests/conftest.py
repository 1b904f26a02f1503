import os
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "data"  # reference facts copied in: a plain clone runs every test


def reference_path(*parts) -> Path:
    """A reference file of tests/data: the original checkpoints' key layouts (keys/*.tsv), the original
    YAML configs (original-configs/), CLIP token ids of reference prompts (tokens.json)."""
    path = REFERENCE.joinpath(*parts)
    assert path.exists(), f"reference file {path} is missing from the checkout"
    return path


# --- shared fixtures ----------------------------------------------------------------------------------------------
# helpers and tiny_model import REPO from here: they are imported inside the fixtures, once this module is whole.
@pytest.fixture(scope="session")
def kdiffusion():
    """(k_diffusion.sampling, k_diffusion.external), loaded by path once (helpers.load_kdiffusion); skips without
    k-diffusion. Tests change these modules only through monkeypatch, so one load serves the whole session."""
    from helpers import load_kdiffusion

    return load_kdiffusion()


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (configs/tiny/txt2img-tiny.yaml, seed 0), a fresh one for each test module: tests change
    its parameterization through monkeypatch, and building it reseeds torch's global generator (module scope
    keeps that reseeding at each module's first use)."""
    from tiny_model import tiny_model

    return tiny_model()


@pytest.fixture(scope="module")
def clip_tiny(tmp_path_factory):
    """A tiny UNet and VAE with SD 1.x's CLIP text encoder: (its diffusers folder, config path, original weights)."""
    from helpers import build_clip_tiny
    return build_clip_tiny(tmp_path_factory.mktemp("clip-tiny"))


@pytest.fixture(autouse=True)
def keep_thread_settings():
    """Code under test sets torch's thread count (training's --threads, a shard's share of the cores, which
    also sets OMP_NUM_THREADS); a later test comparing in-process pictures with a script's must not inherit
    it: a different thread count changes the pictures' last bits."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
