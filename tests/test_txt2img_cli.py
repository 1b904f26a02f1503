"""scripts/txt2img.py end to end on the tiny model: files, numbering, metadata, batches, errors, Ctrl-C."""
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO
from helpers import txt2img
from tiny_model import write_tiny_checkpoint

SCRIPT = REPO / "scripts" / "txt2img.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def quick(ckpt, outdir, *extra):
    return ("--ckpt", ckpt, "--outdir", outdir, "--ddim_steps", 3, "--H", 64, "--W", 64, *extra)


def parameters_of(path):
    with Image.open(path) as image:
        return image.text["parameters"]


def test_samples_grid_and_metadata(ckpt, tmp_path):
    out = tmp_path / "out"
    result = txt2img(*quick(ckpt, out, "--prompt", "a red circle, large", "--negative_prompt", "blurry",
                            "--n_samples", 2, "--n_iter", 2, "--scale", 5, "--seed", 7))
    assert result.returncode == 0, result.stderr
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0000.png"]
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2 per row, 2 rows, 2-pixel gaps
    lines = parameters_of(out / "samples" / "00003.png").splitlines()
    assert lines[0] == "a red circle, large"
    assert lines[1] == "Negative prompt: blurry"
    fields = dict(item.split(": ", 1) for item in lines[2].split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "5.0"
    # the fourth image: seed + 3, its own seed (A1111's convention)
    assert fields["Seed"] == "10" and fields["Size"] == "64x64" and fields["Model"] == "tiny"
    assert len(fields["Model hash"]) == 10
    assert list(fields)[:7] == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model"]


def test_numbering_continues_after_the_highest_and_never_overwrites(ckpt, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    keep = {name: f"user file {name}".encode() for name in ("00000.png", "00005.png")}
    for name, data in keep.items():
        (out / "samples" / name).write_bytes(data)
    (out / "grid-0002.png").write_bytes(b"old grid")
    result = txt2img(*quick(ckpt, out, "--n_samples", 2, "--n_iter", 1))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00005.png", "00006.png", "00007.png"]
    for name, data in keep.items():
        assert (out / "samples" / name).read_bytes() == data
    assert (out / "grid-0002.png").read_bytes() == b"old grid" and (out / "grid-0003.png").is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_prompt_file_with_partial_last_batch_and_odd_size(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\nthird prompt\n")
    out = tmp_path / "out"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--ddim_steps", 2, "--H", 72, "--W", 40,
                     "--from-file", prompts, "--n_samples", 2, "--n_iter", 1, "--plms")
    assert result.returncode == 0, result.stderr
    files = sorted((out / "samples").iterdir())
    assert [parameters_of(f).splitlines()[0] for f in files] == ["first prompt", "second prompt", "third prompt"]
    with Image.open(files[0]) as image:
        assert image.size == (40, 72)
    assert "Sampler: PLMS" in parameters_of(files[0])


def test_same_seed_same_images_other_seed_other_images(ckpt, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = txt2img(*quick(ckpt, tmp_path / name, "--n_samples", 1, "--n_iter", 1, "--seed", seed, "--skip_grid"))
        assert result.returncode == 0, result.stderr
        with Image.open(tmp_path / name / "samples" / "00000.png") as image:
            runs.append(image.tobytes())
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_long_prompt_is_encoded_whole_in_chunks_with_no_warning(ckpt, tmp_path):
    """A1111's long prompts: chunks encoded separately and joined, nothing cut (the tail changes the picture)."""
    pictures = {}
    for words in (90, 80):
        out = tmp_path / str(words)
        result = txt2img(*quick(ckpt, out, "--prompt", "red " * words + "blue", "--n_samples", 1, "--n_iter", 1))
        assert result.returncode == 0, result.stderr
        assert "cut" not in result.stdout + result.stderr
        sample, = (out / "samples").iterdir()
        assert parameters_of(sample).splitlines()[0] == "red " * words + "blue"
        with Image.open(sample) as image:
            pictures[words] = image.tobytes()
    assert pictures[90] != pictures[80]


@pytest.mark.parametrize("case", ["empty_file", "bad_height", "missing_ckpt", "wrong_config", "bad_outdir",
                                  "bad_sampler", "truncated_ckpt"])
def test_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, case):
    out = tmp_path / "out"
    args = list(quick(ckpt, out))
    expect = {
        "empty_file": "holds no prompts", "bad_height": "--H 100 is not a positive multiple of 8",
        "missing_ckpt": "checkpoint not found", "wrong_config": "does not fit config v1-inference.yaml",
        "bad_outdir": "cannot write to output folder", "bad_sampler": "invalid choice", "truncated_ckpt": "truncated",
    }[case]
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("\n  \n")
        args += ["--from-file", tmp_path / "empty.txt"]
    elif case == "bad_height":
        args += ["--H", 100]
    elif case == "missing_ckpt":
        args[1] = tmp_path / "nowhere.ckpt"
    elif case == "wrong_config":
        args += ["--config", REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"]
    elif case == "bad_outdir":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
        args[3] = out
    elif case == "bad_sampler":
        args += ["--sampler", "euler_magic"]
    elif case == "truncated_ckpt":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        args[1] = broken
    result = txt2img(*args)
    assert result.returncode == 2
    assert expect in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())


def test_ctrl_c_keeps_finished_images_and_exits_nonzero(ckpt, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, quick(ckpt, out)), "--ddim_steps", "40",
                                "--n_samples", "1", "--n_iter", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (out / "samples" / "00000.png").exists():
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted at step" in stderr
    files = sorted((out / "samples").iterdir())
    assert 1 <= len(files) < 50
    for f in files:
        with Image.open(f) as image:
            image.verify()
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
