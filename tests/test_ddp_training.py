"""scripts/train.py on two CPU processes (Lightning's DDP on gloo): started by Lightning's own launcher, resumed
under torchrun (slow), and LoRA and embedding training (slow). The training processes build tests/ddp_recording.py's
model and data (--trust_config), which write down per rank and step the samples trained on, the loss and the weights."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ddp_recording import read_records, weights_digest
from ldm.lora_training import initial_vectors
from ldm.modules.embeddings import load_embeddings
from ldm.modules.lora import read_lora
from tiny_model import tiny_model, write_tiny_checkpoint

TINY = REPO / "configs" / "tiny" / "txt2img-tiny.yaml"
TRAIN = REPO / "scripts" / "train.py"
RANKS, BATCH, SAMPLES = 2, 2, 11
# Each rank's share of 11 samples is 5 (the odd one dropped, not padded with a repeat), so 2 batches of 2.
STEPS_PER_EPOCH = SAMPLES // RANKS // BATCH
FIRST_STEPS, RESUMED_STEPS = 4, 6
DDP = ["--accelerator", "cpu", "--devices", str(RANKS), "--strategy", "ddp", "--threads", "1", "--seed", "0",
       "--trust_config"]


def training_config(record_dir):
    return f"""
model:
  target: ddp_recording.RecordingLatentDiffusion
  base_learning_rate: 0.002
  params:
    record_dir: {record_dir}
    use_ema: true
data:
  target: ldm.training.DataModuleFromConfig
  params:
    batch_size: {BATCH}
    num_workers: 0
    train:
      target: ddp_recording.IndexedShapes
      params: {{size: {SAMPLES}, resolution: 32, seed: 0}}
training:
  checkpoint_every_n_steps: 2
  sample_every_n_steps: 0
  sample_prompts: []
  print_every_n_steps: 1
  log_every_n_steps: 1
"""


def run_training(*args, torchrun=False, timeout=300):
    """scripts/train.py, as its own launcher (Lightning starts the other rank) or under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"] \
        if torchrun else [sys.executable]
    # tests/ on the path for the recording classes; one thread per process on a shared CPU.
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(TRAIN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env=env, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def metrics(logdir, run_index):
    """The logged steps of the first run (0) or of the resumed one (1): each run logs to metrics/<start time>/."""
    with open(sorted(logdir.glob("metrics/*/metrics.csv"))[run_index]) as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


def by_event(entries, event):
    return [entry for entry in entries if entry["event"] == event]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """4 steps on 2 processes started by Lightning's launcher (the second rank starts seconds after the first:
    its own log dir name would differ)."""
    root = tmp_path_factory.mktemp("ddp")
    record_dir = root / "records"
    record_dir.mkdir()
    config = root / "ddp-tiny.yaml"
    config.write_text(training_config(record_dir))
    first = run_training("--base", TINY, config, "--logdir", root / "logs", "--max_steps", FIRST_STEPS, *DDP)
    logdir, = (root / "logs").iterdir()
    return {"root": root, "logdir": logdir, "record_dir": record_dir, "stdout": first.stdout,
            "records": read_records(record_dir),
            "files": sorted(str(path.relative_to(logdir)) for path in logdir.rglob("*") if path.is_file()),
            "checkpoint": torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)}


def test_rank_zero_alone_writes_one_log_dir(run):
    files = run["files"]
    assert [name for name in files if name.startswith("checkpoints/")] == [
        "checkpoints/last.ckpt", f"checkpoints/step-{FIRST_STEPS:06d}.ckpt"]
    assert "configs/project.yaml" in files
    assert len([name for name in files if name.endswith("metrics.csv")]) == 1
    assert run["stdout"].count("trained to step") == 1


def test_replicas_end_every_step_with_identical_weights(run):
    records = run["records"]
    assert sorted(records) == list(range(RANKS))
    ends = [[entry["weights"] for entry in by_event(records[rank], "end")] for rank in range(RANKS)]
    assert len(ends[0]) == FIRST_STEPS and ends[0] == ends[1]
    assert len(set(ends[0])) == FIRST_STEPS  # every step changed them
    assert weights_digest(run["checkpoint"]["state_dict"]) == ends[0][-1]


def test_logged_loss_is_the_mean_over_ranks(run):
    rows = metrics(run["logdir"], 0)
    assert [int(row["step"]) for row in rows] == list(range(FIRST_STEPS))
    own = [[entry["loss"] for entry in by_event(run["records"][rank], "loss")] for rank in range(RANKS)]
    for row, rank_losses in zip(rows, zip(*own)):
        assert float(row["train/loss"]) == pytest.approx(sum(rank_losses) / RANKS, rel=1e-6)
    assert own[0] != own[1]


def test_each_epoch_splits_the_data_between_ranks_without_repeats(run):
    starts = [by_event(run["records"][rank], "start") for rank in range(RANKS)]
    # Lightning's padded shares would make 3 steps of the first epoch, one of its samples on both ranks.
    assert [int(row["epoch"]) for row in metrics(run["logdir"], 0)] == [0, 0, 1, 1]
    epochs = [[index for rank in range(RANKS) for step in steps for index in starts[rank][step]["indices"]]
              for steps in (range(0, STEPS_PER_EPOCH), range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == RANKS * STEPS_PER_EPOCH * BATCH
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_ranks_draw_noise_of_their_own(run):
    first_steps = [by_event(run["records"][rank], "start")[0] for rank in range(RANKS)]
    assert first_steps[0]["weights"] == first_steps[1]["weights"]
    assert first_steps[0]["generator"] != first_steps[1]["generator"]


@pytest.mark.slow
def test_resume_under_torchrun_continues_steps_optimizer_and_weights(run):
    resumed = run_training("--resume", run["logdir"], "--max_steps", RESUMED_STEPS, *DDP, torchrun=True)
    assert resumed.stdout.count("trained to step") == 1
    assert [path.name for path in (run["root"] / "logs").iterdir()] == [run["logdir"].name]
    checkpoint = torch.load(run["logdir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == RESUMED_STEPS
    assert {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()} == {RESUMED_STEPS}
    first_end = by_event(run["records"][0], "end")[-1]["weights"]
    records = read_records(run["record_dir"])
    for rank in range(RANKS):
        assert by_event(records[rank], "start")[FIRST_STEPS]["weights"] == first_end
        ends = [entry["weights"] for entry in by_event(records[rank], "end")]
        assert len(ends) == RESUMED_STEPS
        assert weights_digest(checkpoint["state_dict"]) == ends[-1]
    assert [int(row["step"]) for row in metrics(run["logdir"], 1)] == list(range(FIRST_STEPS, RESUMED_STEPS))

ADAPTER_DATA = """
data:
  params:
    train:
      params: {size: 64, caption_words: {purple: lilac}, require: {color: purple}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("adapter, export_name", [
    (["--lora_rank", "2", "--lora_targets", "unet"], "tiny-lora.safetensors"),
    (["--embedding", "lilac", "--init_word", "red"], "lilac.pt"),
])
def test_lora_and_embedding_training_run_on_two_processes(tmp_path, adapter, export_name):
    checkpoint = write_tiny_checkpoint(tmp_path / "model")
    data = tmp_path / "adapter-data.yaml"
    data.write_text(ADAPTER_DATA)
    export = tmp_path / "out" / export_name
    run = run_training("--base", REPO / "configs/latent-diffusion/shapes-ldm.yaml", data, "--base_ckpt", checkpoint,
                       *adapter, "--max_steps", "2", "--batch_size", "2", "--num_workers", "0",
                       "--logdir", tmp_path / "logs", "--export", export, *DDP)
    assert f"Starting with {RANKS} processes" in run.stdout + run.stderr  # Lightning's line once all have joined
    logdir, = (tmp_path / "logs").iterdir()
    assert len([path for path in logdir.iterdir() if path.is_file()]) == 1  # the log dir's copy of the export
    assert run.stdout.count("wrote ") == 2  # the log dir's copy and --export, by rank 0 alone
    if export.suffix == ".safetensors":
        lora = read_lora(export)
        assert lora.layers and all(layer.parts["lora_up.weight"].abs().sum() > 0 for layer in lora.layers.values())
    else:
        encoder = tiny_model().cond_stage_model
        database = load_embeddings(export.parent, encoder, log=lambda line: None)
        assert not torch.equal(database.embeddings["lilac"].vectors, initial_vectors(encoder, "red", 1))
