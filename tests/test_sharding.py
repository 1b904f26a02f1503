"""Runs split between processes by torchrun, and --resume: the same folder as one uninterrupted process."""
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch

from conftest import REPO
from helpers import loaded_in_memory, script_environment
from ldm.generate import sharding
from ldm.generate.errors import UserError
from ldm.generate.manifest import Manifest
from ldm.generate.output import OutputFolder
from ldm.generate.rng import noise_source
from ldm.generate.run import Job
from ldm.generate.txt2img import TextToImage, run_txt2img
from tiny_model import write_tiny_checkpoint

SCRIPT = REPO / "scripts" / "txt2img.py"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a big circle"]


# --- the pieces ----------------------------------------------------------------------------------------------
def test_the_place_torchrun_gives_is_read_from_its_variables():
    assert sharding.from_environment({}) == sharding.Shard()
    shard = sharding.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert shard == sharding.Shard(3, 4, 1, 2) and shard.distributed
    for broken in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(UserError, match="torchrun"):
            sharding.from_environment(broken)


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_replaying_a_batch_s_draws_moves_the_generator_as_the_batch_did(rng):
    """What --seed_mode batch relies on: the draws noted for a batch of 2, replayed for batches of 2 and 1,
    leave a fresh generator where making those batches left it."""
    made, replayed = sharding.DrawRecorder(noise_source(rng, 5)), noise_source(rng, 5)
    for size in (2, 1):
        made.draws.clear()
        made.randn([size, 4, 8, 8])
        made.brownian_seeds(size)
        for _ in range(3):
            made.randn([size, 4, 8, 8])
        made.randn([size, 3, 4, 4])
        if size == 2:
            pattern = made.pattern(2)
    assert pattern == [["randn", [4, 8, 8], 1], ["seeds", [], 1], ["randn", [4, 8, 8], 3], ["randn", [3, 4, 4], 1]]
    assert made.pattern(1) == pattern
    sharding.replay(pattern, 2, replayed)
    sharding.replay(pattern, 1, replayed)
    assert torch.equal(replayed.randn([2, 4, 8, 8]), made.source.randn([2, 4, 8, 8]))
    made.draws.clear()
    made.randn([3, 2])
    with pytest.raises(RuntimeError, match="another size"):
        made.pattern(2)


def test_a_manifest_line_cut_short_by_a_crash_is_not_read(tmp_path):
    manifest = Manifest(tmp_path / "out")
    manifest.append({"run": {"seed": 1}})
    manifest.append({"batch": 1, "image": 0, "prompt": "a, \"b\"\nc", "file": "samples/00000.png"})
    with open(manifest.path, "a") as f:
        f.write('{"batch": 1, "image": 1, "pro')
    contents = manifest.read()
    assert contents.run == {"seed": 1} and [p["prompt"] for p in contents.pictures] == ["a, \"b\"\nc"]


def test_threads_are_shared_out_unless_the_user_chose_their_number(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sharding.threads_set_by_user()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert not sharding.threads_set_by_user()


def test_under_torchrun_an_earlier_manifest_is_continued_only_with_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    Manifest(tmp_path).append({"run": {}})
    with pytest.raises(UserError, match="--resume"):
        sharding.start(Namespace(device="cpu"), OutputFolder(tmp_path))
    with pytest.raises(UserError, match="--skip_save"):
        sharding.start(Namespace(device="cpu"), OutputFolder(tmp_path, save_samples=False, resume=True))


# --- one process, in this one: --resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny):
    return loaded_in_memory(tiny)


def job(**settings) -> Job:
    return Job(**{"batches": [PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:]], "n_iter": 2, "steps": 3, "height": 64,
                  "width": 64, "seed": 7, **settings})


def resumable(loaded, outdir, the_job) -> int:
    return sharding.run_and_report(the_job, TextToImage(), loaded, OutputFolder(outdir, resume=True))


def folder_bytes(outdir) -> dict:
    """The pictures by name; a temporary file a killed process left (hidden, never a picture's name) aside."""
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*.png"))
            if not p.name.startswith(".")}


def pictures_of(outdir) -> list:
    """The manifest's picture lines without the rank that made them, in picture order."""
    records = Manifest(outdir).read().pictures
    return sorted(({k: v for k, v in r.items() if k != "rank"} for r in records), key=lambda r: r["image"])


@pytest.mark.parametrize("settings", [{}, {"seed_mode": "batch", "sampler": "euler_a"}], ids=["a1111", "batch"])
def test_resume_makes_what_is_missing_as_an_uninterrupted_run_would(loaded, tmp_path, capsys, settings):
    the_job = job(**settings)
    plain = tmp_path / "plain"
    run_txt2img(the_job, loaded, OutputFolder(plain), log=lambda _: None)
    out = tmp_path / "out"
    assert resumable(loaded, out, the_job) == 0
    whole, manifest = folder_bytes(out), Manifest(out).path.read_text()
    assert whole == folder_bytes(plain)  # the manifest changes nothing else: same names, same bytes
    assert "done: 10 images made, 0 skipped" in capsys.readouterr().out

    # a crash: batch 2's second picture lost, batch 4's first saved but not noted, a line cut short
    (out / "samples" / "00003.png").unlink()
    lines = manifest.splitlines(keepends=True)
    noted = [line for line in lines if '"image": 5,' not in line]
    (out / "grid-0000.png").unlink()
    Manifest(out).path.write_text("".join(noted) + '{"batch": 6, "ima')
    assert resumable(loaded, out, the_job) == 0
    assert "done: 4 images made, 6 skipped" in capsys.readouterr().out  # batches 2 and 4 again
    assert folder_bytes(out) == whole
    assert sorted(Manifest(out).path.read_text().splitlines()) == sorted(manifest.splitlines())
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]

    assert resumable(loaded, out, the_job) == 0  # nothing left to make: only the grid again
    assert "0 images made, 10 skipped" in capsys.readouterr().out and (out / "grid-0001.png").is_file()


def test_a_reserved_number_another_run_took_is_never_overwritten(loaded, tmp_path, capsys):
    out, small = tmp_path / "out", job(batches=[PROMPTS[:1], PROMPTS[1:2]], n_iter=1, save_grid=False)
    assert resumable(loaded, out, small) == 0
    # a crash before the second picture, and another run that wrote its own on the number reserved for it
    manifest = Manifest(out).path
    manifest.write_text("".join(line for line in manifest.read_text().splitlines(True) if '"image": 1,' not in line))
    (out / "samples" / "00001.png").write_bytes(b"another run's picture")
    assert resumable(loaded, out, small) == 0
    output = capsys.readouterr().out
    assert "00001.png, reserved for this run, was taken by another; saved as 00002.png" in output
    assert (out / "samples" / "00001.png").read_bytes() == b"another run's picture"
    assert [record["file"] for record in pictures_of(out)] == ["samples/00000.png", "samples/00002.png"]


def test_resume_refuses_the_manifest_of_another_run(loaded, tmp_path, capsys):
    out = tmp_path / "out"
    assert resumable(loaded, out, job(batches=[PROMPTS[:1]], n_iter=1)) == 0
    before = folder_bytes(out)
    with pytest.raises(UserError, match="other prompts, seeds"):
        resumable(loaded, out, job(batches=[PROMPTS[:1]], n_iter=1, seed=8))
    assert folder_bytes(out) == before


def test_seed_mode_batch_refuses_what_it_cannot_replay(loaded, tmp_path):
    with pytest.raises(UserError, match="--fixed_code"):
        resumable(loaded, tmp_path, job(seed_mode="batch", fixed_code=True))
    assert not list(tmp_path.iterdir())


# --- under torchrun --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def options(ckpt, prompt_file, outdir, *extra) -> list:
    return [SCRIPT, "--ckpt", ckpt, "--outdir", outdir, "--ddim_steps", 3, "--H", 64, "--W", 64, "--from-file",
            prompt_file, "--n_samples", 2, "--n_iter", 2, "--seed", 11, *extra]


def launch(*arguments, nproc=1, launcher=(), **popen) -> subprocess.Popen:
    """The script under torchrun (nproc processes), or on its own when nproc is None."""
    command = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", str(nproc), *map(str, launcher)]
    return subprocess.Popen([*command, *map(str, arguments)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=script_environment(OMP_NUM_THREADS="1"), **popen)


def finished(process: subprocess.Popen, timeout=300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def assert_same_folder(outdir, reference):
    assert folder_bytes(outdir) == folder_bytes(reference)
    assert pictures_of(outdir) == pictures_of(reference)
    ours, theirs = Manifest(outdir).read(), Manifest(reference).read()
    assert (ours.run, ours.draws) == (theirs.run, theirs.draws)


@pytest.fixture(scope="module")
def reference(ckpt, prompt_file, tmp_path_factory):
    """One process's folder (--resume, for its manifest)."""
    outdir = tmp_path_factory.mktemp("reference") / "out"
    finished(launch(*options(ckpt, prompt_file, outdir, "--resume"), nproc=None))
    return outdir


def test_two_processes_write_what_one_writes(ckpt, prompt_file, reference, tmp_path):
    outdir = tmp_path / "out"
    output = finished(launch(*options(ckpt, prompt_file, outdir), nproc=2, launcher=["--standalone"]))
    assert "done: 10 images made by 2 processes, 0 skipped" in output
    assert_same_folder(outdir, reference)
    assert {record["rank"] for record in Manifest(outdir).read().pictures} == {0, 1}


JOIN_AND_EXIT = r"""
import atexit, sys
from argparse import Namespace
import torch.distributed as dist
from ldm.generate import sharding
# registered first, so run last: after every exit handler that start() registered
atexit.register(lambda: sys.stdout.write(f"left the group: {not dist.is_initialized()}\n"))
sharding.start(Namespace(device="cpu"), Namespace(resume=False, save_samples=True, outdir=sys.argv[1]))
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, dist.get_rank())
assert ranks == list(range(dist.get_world_size())), ranks
"""


def test_each_process_leaves_the_group_before_the_interpreter_ends(tmp_path):
    """Gloo's threads left to the interpreter's teardown can abort a process whose work is done (SIGABRT,
    "terminate called without an active exception"), failing the run at random."""
    script = tmp_path / "join_and_exit.py"
    script.write_text(JOIN_AND_EXIT)
    output = finished(launch(script, tmp_path / "out", nproc=2, launcher=["--standalone"]), timeout=120)
    assert output.count("left the group: True") == 2, output[-3000:]


@pytest.mark.slow
def test_three_processes_in_seed_mode_batch_write_what_one_writes(ckpt, prompt_file, tmp_path):
    """6 batches, 2 of them of one picture, shared by 3: each process replays the draws of the others'."""
    extra = ("--seed_mode", "batch", "--sampler", "euler_a")
    one, three = tmp_path / "one", tmp_path / "three"
    finished(launch(*options(ckpt, prompt_file, one, "--resume", *extra), nproc=None))
    finished(launch(*options(ckpt, prompt_file, three, *extra), nproc=3, launcher=["--standalone"]))
    assert_same_folder(three, one)
    assert Manifest(three).read().draws is not None


def rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the worker of this rank that the torchrun launcher started."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in children:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_a_run_whose_process_was_killed_resumes_to_the_same_folder(ckpt, prompt_file, tmp_path):
    """Rank 1 killed (SIGKILL) after its first picture; torchrun stops rank 0; the rerun with --resume makes
    the rest. Steps enough that the run is still going when the kill comes."""
    reference, outdir = tmp_path / "reference", tmp_path / "out"
    finished(launch(*options(ckpt, prompt_file, reference, "--resume", "--ddim_steps", 30), nproc=None))
    arguments = options(ckpt, prompt_file, outdir, "--resume", "--ddim_steps", 30)
    run = launch(*arguments, nproc=2, launcher=["--standalone"])
    manifest, deadline = Manifest(outdir), time.monotonic() + 240
    while not any(record.get("rank") == 1 for record in manifest.read().pictures):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before a process could be killed"
        time.sleep(0.02)
    os.kill(rank_process(run.pid, 1), signal.SIGKILL)
    output, _ = run.communicate(timeout=120)
    assert run.returncode != 0, output[-2000:]
    made = len(manifest.read().pictures)
    assert 0 < made < 10 and not (outdir / "grid-0000.png").exists()
    output = finished(launch(*arguments, nproc=2, launcher=["--standalone"]))
    assert "skipped (complete before)" in output
    assert_same_folder(outdir, reference)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_machines_write_what_one_process_writes(ckpt, prompt_file, reference, tmp_path):
    """Two torchrun launchers meeting on loopback, as two machines meet on their network."""
    outdir, port = tmp_path / "out", free_port()
    nodes = [launch(*options(ckpt, prompt_file, outdir), nproc=1,
                    launcher=["--nnodes", 2, "--node_rank", rank, "--master_addr", "127.0.0.1", "--master_port", port])
             for rank in (0, 1)]
    outputs = [finished(node) for node in nodes]
    assert "done: 10 images made by 2 processes" in outputs[0]
    assert_same_folder(outdir, reference)
