"""A checkpoint truncated or rewritten in place while a run uses it never kills the run with a signal.

Normal mode: after loading, no weight is a view of the file, so the run finishes as if nothing happened.
Low-memory mode keeps the file mapped: it stops before the next component switch with one line naming
the file, the images already saved intact.
"""
import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import REPO
from helpers import script_environment
from ldm.checkpoint import load_model
from ldm.generate.loading import load
from ldm.placement import CheckpointChanged, mapped_ranges
from tiny_model import TINY_CONFIG, write_tiny_checkpoint

SCRIPT = REPO / "scripts" / "txt2img.py"
BATCHES = 4


def quiet(message):
    pass


def start_txt2img(ckpt, outdir, *extra) -> subprocess.Popen:
    """One image per batch; 40 steps make each batch last long enough to truncate the file during the next."""
    env = script_environment(TQDM_DISABLE="1", OMP_NUM_THREADS="1")  # one thread: the tiny model needs no more
    args = ["--ckpt", ckpt, "--outdir", outdir, "--ddim_steps", 40, "--H", 64, "--W", 64, "--n_samples", 1,
            "--n_iter", BATCHES, "--skip_grid", *extra]
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def truncate_after_the_first_image(process: subprocess.Popen, samples, ckpt, settle: float) -> int:
    """Truncate `ckpt` to 0 bytes once the first picture is saved (and `settle` seconds more, so that the
    next batch is sampling); returns how many pictures were saved by then."""
    deadline = time.time() + 120  # a loaded machine can be slow
    while not (samples / "00000.png").exists():
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.01)
    time.sleep(settle)
    assert process.poll() is None, "the run ended before the file could be changed under it"
    os.truncate(ckpt, 0)
    return len(list(samples.iterdir()))


def assert_valid_pngs(samples) -> list:
    files = sorted(samples.iterdir())
    for path in files:
        with Image.open(path) as image:
            image.verify()
    assert not [p for p in samples.parent.rglob("*") if p.name.startswith(".")]  # no partial files
    return files


@pytest.fixture
def ckpt(tmp_path):
    return write_tiny_checkpoint(tmp_path / "model")


def test_normal_mode_finishes_every_image_after_the_file_is_truncated(ckpt, tmp_path):
    samples = tmp_path / "out" / "samples"
    process = start_txt2img(ckpt, tmp_path / "out")
    saved_before = truncate_after_the_first_image(process, samples, ckpt, settle=0.0)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr  # a SIGBUS would be -7
    assert saved_before < BATCHES
    assert len(assert_valid_pngs(samples)) == BATCHES


def test_low_memory_mode_stops_with_one_line_naming_the_file(ckpt, tmp_path):
    samples = tmp_path / "out" / "samples"
    process = start_txt2img(ckpt, tmp_path / "out", "--lowmem")
    saved_before = truncate_after_the_first_image(process, samples, ckpt, settle=0.3)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode > 0, stderr  # an exit status, not a signal
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "the checkpoint file changed on disk while it was in use" in lines[0] and str(ckpt) in lines[0]
    files = assert_valid_pngs(samples)
    assert saved_before <= len(files) < BATCHES


def file_backed(tensor: torch.Tensor, ranges) -> bool:
    return any(start <= tensor.data_ptr() < stop for start, stop in ranges)


def test_no_weight_is_a_view_of_the_file_after_a_normal_load(ckpt):
    loaded = load_model(ckpt, TINY_CONFIG, dtype=torch.float32, log=quiet)
    ranges = mapped_ranges(ckpt)
    assert not [name for name, t in loaded.model.state_dict().items() if file_backed(t, ranges)]
    assert loaded.components is None


def test_low_memory_component_in_use_is_a_copy_and_the_others_stay_mapped(ckpt):
    loaded = load_model(ckpt, TINY_CONFIG, dtype=torch.float32, log=quiet, low_memory=True)
    unet = loaded.use("model")
    ranges = mapped_ranges(ckpt)
    assert ranges and not any(file_backed(p, ranges) for p in unet.parameters())
    assert all(file_backed(p, ranges) for p in loaded.model.first_stage_model.parameters())


def test_low_memory_switch_after_a_rewrite_in_place_raises_one_line(ckpt):
    loaded = load_model(ckpt, TINY_CONFIG, dtype=torch.float32, log=quiet, low_memory=True)
    loaded.use("model")
    time.sleep(0.01)  # a distinct mtime, even on coarse-grained file systems
    ckpt.write_bytes(ckpt.read_bytes())  # the same bytes, rewritten: the size is unchanged, the mtime not
    with pytest.raises(CheckpointChanged, match="the checkpoint file changed on disk while it was in use") as error:
        loaded.use("first_stage_model")
    assert str(ckpt) in str(error.value) and "\n" not in str(error.value)


def test_replacing_the_file_by_rename_is_harmless_for_the_weights(ckpt, tmp_path):
    loaded = load_model(ckpt, TINY_CONFIG, dtype=torch.float32, log=quiet, low_memory=True)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    os.replace(other, ckpt)  # the loaded inode stays mapped, unchanged
    loaded.use("model")
    loaded.use("first_stage_model")


def test_model_hash_describes_the_file_as_loaded(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = load(str(ckpt), None, "cpu", "full", log=quiet)
    assert len(first.hash) == 10
    os.replace(write_tiny_checkpoint(tmp_path / "other", seed=1), ckpt)
    assert first.hash != load(str(ckpt), None, "cpu", "full", log=quiet).hash  # computed at load, kept
