"""Output faults: a full disk, a file-size limit, permissions, folders left behind, Ctrl-C while loading,
names that differ only in case, and scripts/evaluate_adherence.py under the same rules.

Each case asserts the promise: the exit status, exactly one line on stderr with no traceback, and the
files on disk before and after. The scripts run in a subprocess where the process itself is under test
(a file-size limit, a signal, another working folder); the rest runs in this process.
"""
import errno
import importlib.util
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from ldm.generate import output, run as run_module
from ldm.generate.errors import UserError
from ldm.generate.loading import LoadedModel
from ldm.generate.options import run_cli
from ldm.generate.output import MAX_NAME_TRIES, OutputFolder, SaveFailed, model_hash
from ldm.generate.run import Job, run_and_report
from ldm.generate.txt2img import TextToImage
from tiny_model import TINY_CONFIG, tiny_model, write_tiny_checkpoint

TXT2IMG = REPO / "scripts" / "txt2img.py"
EVALUATE = REPO / "scripts" / "evaluate_adherence.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded():
    return LoadedModel(tiny_model(), None, TINY_CONFIG, torch.device("cpu"), torch.float32, latent_channels=4,
                       downsampling_factor=8, native_size=64)


def stderr_lines(text: str) -> list[str]:
    """The lines a terminal shows: progress bars redraw themselves after a carriage return."""
    return [shown.strip() for line in text.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]


def one_error_line(stderr: str) -> str:
    lines = stderr_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def everything_under(folder) -> dict:
    """Every path under `folder` (relative), with the bytes of the files (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def hidden_files(folder) -> list:
    return [p for p in folder.rglob("*") if p.name.startswith(".")]


def assert_readable_pngs(paths):
    for path in paths:
        with Image.open(path) as image:
            image.verify()


def run_script(script, *args, cwd=None, preexec_fn=None, timeout=120):
    env = {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache")}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, timeout=timeout,
                            env=env, cwd=cwd, preexec_fn=preexec_fn)
    # decoded here, since text mode would turn the progress bars' carriage returns into line breaks
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def quick(ckpt, outdir, *extra):
    return ("--ckpt", ckpt, "--outdir", outdir, "--ddim_steps", 2, "--H", 64, "--W", 64, *extra)


# --- full disk and file-size limit, in a real process ----------------------------------------------------------
FILE_SIZE_LIMIT = 15_000  # bytes: a 64x64 sample of the tiny model fits (~10 kB), a grid of two does not


def limit_file_size():
    os.umask(0o022)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_file_size_limit_keeps_the_samples_and_names_what_was_saved(ckpt, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00007.png").write_bytes(b"a picture of the user's")
    before = everything_under(out)
    result = run_script(TXT2IMG, *quick(ckpt, out, "--n_samples", 2, "--n_iter", 1), preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr  # not killed by SIGXFSZ: the write failed with EFBIG
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: cannot save the grid to {out}: File too large")
    assert "ulimit -f" in line and line.endswith(f"kept 2 images in {out / 'samples'}")
    after = everything_under(out)
    assert {name: data for name, data in after.items() if name in before} == before
    new = sorted(set(after) - set(before))
    assert new == ["samples/00008.png", "samples/00009.png"]
    assert_readable_pngs(out / name for name in new)
    assert all((out / name).stat().st_mode & 0o777 == 0o644 for name in new)
    assert not hidden_files(out)


@pytest.fixture()
def small_disk(tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mount_point)],
                                 capture_output=True, timeout=30).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("mounting a small tmpfs is not permitted here (the file-size limit test covers the same path)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def test_disk_full_keeps_the_finished_images_and_leaves_nothing_partial(ckpt, small_disk):
    out = small_disk / "out"
    result = run_script(TXT2IMG, *quick(ckpt, out, "--n_samples", 4, "--n_iter", 1, "--skip_grid"))
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith(f"error: cannot save a picture to {out / 'samples'}: No space left on device")
    saved = sorted((out / "samples").iterdir())
    assert 1 <= len(saved) < 4
    assert line.endswith(f"kept {len(saved)} images in {out / 'samples'}")
    assert [p.name for p in saved] == [f"{n:05}.png" for n in range(len(saved))]
    assert_readable_pngs(saved)
    assert not hidden_files(small_disk)


# --- the same in this process: the PNG write fails after N pictures -------------------------------------------
def fail_png_writes_after(monkeypatch, count: int, error=errno.ENOSPC):
    """The PNG encoder writes a little, then fails like a full disk, from the (count+1)-th picture on."""
    real_save, calls = Image.Image.save, []

    def save(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > count:
            fp.write(b"\x89PNG half a picture")
            raise OSError(error, os.strerror(error))
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def small_job(**settings):
    return Job(**{"batches": [["a", "b", "c"]], "steps": 2, "height": 64, "width": 64, "watermark": False,
                  **settings})


def test_disk_full_after_two_pictures_in_process(loaded, tmp_path, monkeypatch, capsys):
    folder = OutputFolder(tmp_path / "out")
    fail_png_writes_after(monkeypatch, 2)
    status = run_and_report(small_job(), TextToImage(), loaded, folder)
    assert status == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: cannot save a picture to {folder.samples}: No space left on device (the disk is full: "
                    f"free some space or pass --outdir on another disk); kept 2 images in {folder.samples}")
    assert list(everything_under(tmp_path / "out")) == ["samples", "samples/00000.png", "samples/00001.png"]
    assert_readable_pngs(folder.samples.iterdir())


def test_grid_that_cannot_be_written_keeps_the_samples(loaded, tmp_path, monkeypatch, capsys):
    folder = OutputFolder(tmp_path / "out")
    fail_png_writes_after(monkeypatch, 3, errno.EFBIG)
    assert run_and_report(small_job(), TextToImage(), loaded, folder) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot save the grid to {folder.outdir}: File too large")
    assert line.endswith(f"kept 3 images in {folder.samples}")
    assert sorted(everything_under(folder.outdir)) == ["samples", *(f"samples/0000{n}.png" for n in range(3))]


def test_a_first_save_that_fails_removes_exactly_the_folders_it_made(loaded, tmp_path, monkeypatch, capsys):
    (tmp_path / "existing").mkdir()
    folder = OutputFolder(tmp_path / "existing" / "new" / "nested")
    fail_png_writes_after(monkeypatch, 0)
    assert run_and_report(small_job(), TextToImage(), loaded, folder) == 1
    assert one_error_line(capsys.readouterr().err).endswith("; nothing was saved")
    assert list(everything_under(tmp_path)) == ["existing"]


def test_a_second_ctrl_c_stops_at_once_and_keeps_what_is_saved(loaded, tmp_path, monkeypatch, capsys):
    real_sample, calls = run_module.sample, []

    def sample_then_second_ctrl_c(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(run_module, "sample", sample_then_second_ctrl_c)
    folder = OutputFolder(tmp_path / "out")
    assert run_and_report(small_job(batches=[["a"], ["b"]]), TextToImage(), loaded, folder) == 130
    assert one_error_line(capsys.readouterr().err) == (
        f"interrupted at once by a second Ctrl-C: kept 1 images in {folder.samples}")
    assert [p.name for p in folder.samples.iterdir()] == ["00000.png"] and len(calls) == 2
    assert not hidden_files(tmp_path)


# --- permissions and names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_pictures_get_the_usual_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder, image = OutputFolder(tmp_path / "out"), np.zeros((8, 8, 3), np.uint8)
        paths = [folder.save_sample(image, "p"), folder.save_grid(image, "")]
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o666 & ~umask] * 2


def test_numbering_sees_names_in_any_case(tmp_path):
    folder = OutputFolder(tmp_path)
    folder.samples.mkdir()
    (folder.samples / "00004.PNG").write_bytes(b"user file")
    (tmp_path / "GRID-0002.png").write_bytes(b"user grid")
    image = np.zeros((8, 8, 3), np.uint8)
    assert folder.save_sample(image, None).name == "00005.png"
    assert folder.save_grid(image, None).name == "grid-0003.png"


def test_a_name_that_is_always_taken_ends_in_bounded_tries(loaded, tmp_path, monkeypatch, capsys):
    """A case-insensitive filesystem with 00000.PNG says 'exists' to 00000.png: the loop must not spin."""
    folder = OutputFolder(tmp_path / "out")
    folder.samples.mkdir(parents=True)
    (folder.samples / "00000.PNG").write_bytes(b"user file")
    tries = []

    def link_always_taken(source, target):
        tries.append(target)
        raise FileExistsError(errno.EEXIST, "File exists", str(target))

    monkeypatch.setattr(output.os, "link", link_always_taken)
    assert run_and_report(small_job(batches=[["a"]]), TextToImage(), loaded, folder) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot save a picture to {folder.samples}: no free file name after "
                           f"{MAX_NAME_TRIES} tries")
    assert "differ only in case" in line and line.endswith("; nothing was saved")
    assert len(tries) == MAX_NAME_TRIES and len(set(tries)) == MAX_NAME_TRIES  # a new name each time
    assert everything_under(folder.outdir) == {"samples": None, "samples/00000.PNG": b"user file"}


def test_model_hash_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkpoint = tmp_path / "m.ckpt"
    checkpoint.write_bytes(b"weights")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output.os, "replace", disk_full)
    assert len(model_hash(checkpoint)) == 10
    assert list((tmp_path / "cache" / "ldm").iterdir()) == []  # no temporary file left


# --- refusals create nothing; Ctrl-C while loading ---------------------------------------------------------------
def test_checking_the_output_folder_creates_nothing(tmp_path):
    OutputFolder(tmp_path / "a" / "b" / "c").check_writable()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=f"{tmp_path / 'a_file'} is not a folder"):
        OutputFolder(tmp_path / "a_file" / "out").check_writable()
    assert everything_under(tmp_path) == {"a_file": b"x"}


def script_module(script):
    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_in_process(module, arguments, monkeypatch, capsys) -> tuple[int, str]:
    """run_cli(module.main) with these arguments: (exit status, the one line on stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, arguments)])
    with pytest.raises(SystemExit) as exit_status:
        run_cli(module.main)
    return exit_status.value.code, one_error_line(capsys.readouterr().err)


def test_a_refused_run_leaves_no_new_folders(tmp_path, monkeypatch, capsys):
    arguments = quick(tmp_path / "nowhere.ckpt", tmp_path / "new" / "nested" / "out")
    status, line = main_in_process(script_module(TXT2IMG), arguments, monkeypatch, capsys)
    assert status == 2 and "checkpoint not found" in line
    assert list(tmp_path.iterdir()) == []


SLOW_LOADING = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
from ldm.generate import loading
assert hasattr(loading, "load_model"), "the test's stand-in for slow loading needs loading.load_model"
def slow_load_model(*args, **kwargs):
    print("loading", flush=True)
    time.sleep(120)
loading.load_model = slow_load_model
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_ctrl_c_while_loading_is_one_line_and_exit_130(ckpt, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_LOADING.format(repo=str(REPO), script=str(TXT2IMG)),
                                *map(str, quick(ckpt, out))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, process.kill)
    watchdog.start()
    try:
        printed = []
        for line in process.stdout:  # ends early only if the script does
            printed.append(line)
            if line == "loading\n":
                break
        assert printed[-1:] == ["loading\n"], (printed, process.stderr.read())
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        watchdog.cancel()
        process.kill()
    assert process.returncode == 130
    assert one_error_line(stderr) == "interrupted by Ctrl-C before sampling started: nothing was saved"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_script_imports_torch_is_one_line_and_exit_130(ckpt, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(TXT2IMG), *map(str, quick(ckpt, out))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # importing torch takes seconds
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert one_error_line(stderr) == "interrupted by Ctrl-C while starting: nothing was saved"
    assert list(tmp_path.iterdir()) == []


def test_run_cli_turns_each_failure_into_one_line(capsys):
    def raising(error):
        def main():
            raise error
        return main

    for error, status in ((UserError("bad --flag"), 2), (KeyboardInterrupt(), 130),
                          (SaveFailed("a picture", "out", OSError(errno.ENOSPC, "No space left on device")), 1)):
        with pytest.raises(SystemExit) as exit_status:
            run_cli(raising(error))
        assert exit_status.value.code == status
        assert len(stderr_lines(capsys.readouterr().err)) == 1
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN


# --- scripts/evaluate_adherence.py ---------------------------------------------------------------------------------
def test_evaluate_adherence_finds_the_shipped_model_from_any_folder(tmp_path):
    result = run_script(EVALUATE, "--seen", 1, "--heldout", 0, "--steps", 2, "--batch_size", 1,
                        "--grid", "grids/adherence.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seen: 1 images" in result.stdout and "Traceback" not in result.stderr
    assert sorted(everything_under(tmp_path)) == ["grids", "grids/adherence-seen.png", "grids/adherence-seen.txt"]
    assert_readable_pngs([tmp_path / "grids" / "adherence-seen.png"])


@pytest.fixture(scope="module")
def evaluate_module():
    return script_module(EVALUATE)


EVALUATE_REFUSALS = {
    "missing_ckpt": (["--ckpt", "{tmp}/nowhere.ckpt"], "checkpoint not found"),
    "not_a_checkpoint": (["--ckpt", "{tmp}/notes.txt"], "notes.txt"),
    "zero_steps": (["--steps", "0"], "--steps must be at least 1"),
    "too_many_steps": (["--steps", "5000"], "--steps 5000 is more than the model's 1000 timesteps"),
    "zero_batch": (["--batch_size", "0"], "--batch_size must be at least 1"),
    "negative_count": (["--seen", "-1"], "--seen must be 0 or more"),
    "nothing_to_do": (["--seen", "0", "--heldout", "0"], "nothing to evaluate"),
    "nan_scale": (["--scale", "nan"], "--scale must be a finite number"),
    "negative_seed": (["--seed", "-1"], "--seed -1 is outside 0.."),
    "seed_past_64_bits": (["--seed", str(2**64)], f"--seed {2**64} is outside 0..{2**64 - 1}"),
    "grid_under_a_file": (["--grid", "{tmp}/notes.txt/grid.png"], "notes.txt is not a folder"),
    "grid_unknown_format": (["--grid", "{tmp}/new/grid.unknown"], "use a name ending in .png"),
    "not_a_number": (["--steps", "many"], "invalid int value"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_REFUSALS))
def test_evaluate_adherence_refuses_in_one_line_and_creates_nothing(evaluate_module, case, tmp_path, monkeypatch,
                                                                    capsys):
    arguments, expected = EVALUATE_REFUSALS[case]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    arguments = [a.format(tmp=tmp_path) for a in arguments]
    if "--grid" not in arguments:
        arguments += ["--grid", str(tmp_path / "fresh" / "nested" / "grid.png")]
    status, line = main_in_process(evaluate_module, ["--seen", 1, "--heldout", 0, *arguments], monkeypatch, capsys)
    assert status == 2 and expected in line
    assert everything_under(tmp_path) == {"notes.txt": b"not a checkpoint"}
