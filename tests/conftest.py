import os
from pathlib import Path


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
