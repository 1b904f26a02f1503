"""Training through scripts/train.py's code path on the tiny config: loss, checkpoint format, resume, export."""
import csv
import importlib.util
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_model
from ldm.generate.errors import UserError
from ldm.lr_scheduler import LambdaLinearScheduler
from ldm.modules.ema import ema_name
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny" / "txt2img-tiny.yaml"
BASE_LR = 2e-3
WARM_UP = 10

# Merged over the tiny model config, as a second --base: EMA on, a warm-up, and a fixed batch of four
# 32x32 scenes (4x4 latents) with no caption dropout, so that the loss must fall.
TRAINING_CONFIG = f"""
model:
  base_learning_rate: {BASE_LR}
  params:
    use_ema: true
    scheduler_config:
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params: {{warm_up_steps: [{WARM_UP}], cycle_lengths: [10000000000000], f_start: [0.1], f_max: [1.0], f_min: [1.0]}}
data:
  target: ldm.training.DataModuleFromConfig
  params:
    batch_size: 4
    num_workers: 0
    shuffle: false
    train:
      target: ldm.data.shapes.ShapesDataset
      params: {{size: 4, resolution: 32, seed: 0}}
training:
  checkpoint_every_n_steps: 1000
  sample_every_n_steps: 0
  print_every_n_steps: 10
  log_every_n_steps: 1
  sample_steps: 2
  sample_prompts: [a small red circle on the left on a blue background]
"""


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(logdir):
    """The rows of the latest run's metrics.csv in `logdir`."""
    with open(sorted(logdir.glob("metrics/*/metrics.csv"))[-1]) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """30 steps of the tiny model, then a resume to step 35; returns (train script, log dir, export path)."""
    root = tmp_path_factory.mktemp("training")
    config = root / "train-tiny.yaml"
    config.write_text(TRAINING_CONFIG)
    export = root / "export" / "model.ckpt"
    script = load_train_script()
    logdir, trainer = script.main(["--base", str(TINY), str(config), "--logdir", str(root / "logs"),
                                   "--max_steps", "30", "--seed", "0", "--export", str(export)])
    assert trainer.global_step == 30
    first_run_metrics = read_metrics(logdir)
    first_checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)
    script.main(["--resume", str(logdir), "--max_steps", "35"])
    return {"logdir": logdir, "export": export, "metrics": first_run_metrics, "checkpoint": first_checkpoint}


def test_loss_is_finite_and_falls_on_a_fixed_batch(run):
    losses = [float(row["train/loss"]) for row in run["metrics"] if row.get("train/loss")]
    assert len(losses) == 30
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, f"loss did not fall: first 10 steps {first:.3f}, last 10 {last:.3f}"


def test_learning_rate_warms_up_as_configured(run):
    rates = {int(row["step"]): float(row["lr"]) for row in run["metrics"] if row.get("lr")}
    schedule = LambdaLinearScheduler(warm_up_steps=[WARM_UP], cycle_lengths=[10**13], f_start=[0.1], f_max=[1.0],
                                     f_min=[1.0])
    # Logged in step k's training_step, before that step's scheduler update: the rate of step k.
    for step in (0, 5, 9, 20):
        assert rates[step] == pytest.approx(BASE_LR * schedule(step), rel=1e-5)
    assert rates[20] == pytest.approx(BASE_LR)


def test_lambda_linear_scheduler_values():
    schedule = LambdaLinearScheduler(warm_up_steps=[10, 0], f_start=[0.0, 1.0], f_max=[1.0, 0.5],
                                     f_min=[0.5, 0.0], cycle_lengths=[20, 100])
    # As the original: the decay is measured from the start of the cycle, warm-up included.
    assert [schedule(n) for n in (0, 5, 10)] == pytest.approx([0.0, 0.5, 0.75])
    assert schedule(15) == pytest.approx(0.5 + 0.5 * 5 / 20)   # decaying towards f_min within the first cycle
    assert schedule(20) == pytest.approx(0.5)                  # second cycle starts at its f_max
    assert schedule(70) == pytest.approx(0.5 * 50 / 100)
    assert schedule(10**6) == pytest.approx(0.0)               # past the last cycle: its f_min
    with pytest.raises(ValueError):
        LambdaLinearScheduler(warm_up_steps=[1], f_start=[0.0], f_max=[1.0], f_min=[1.0], cycle_lengths=[1, 2])


def test_checkpoint_has_the_original_format(run):
    checkpoint = run["checkpoint"]
    assert checkpoint["global_step"] == 30
    config = OmegaConf.merge(OmegaConf.load(TINY), OmegaConf.create(TRAINING_CONFIG))
    expected = instantiate_from_config(config.model).state_dict().keys()
    assert set(checkpoint["state_dict"]) == set(expected)
    assert any(key.startswith("model_ema.") for key in checkpoint["state_dict"])
    assert checkpoint["state_dict"]["model_ema.num_updates"].item() == 30


def test_resume_continues_from_the_saved_step(run):
    checkpoint = torch.load(run["logdir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 35
    # Adam's per-parameter step count carries over only if the optimizer state was restored too.
    adam_steps = {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    assert adam_steps == {35}
    assert checkpoint["state_dict"]["model_ema.num_updates"].item() == 35
    steps = [int(row["step"]) for row in read_metrics(run["logdir"]) if row.get("train/loss")]
    assert steps[-5:] == list(range(30, 35))


def test_a_resume_checkpoint_that_would_run_code_is_refused_in_one_line(run, tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'MARKER'}",))

    logdir = tmp_path / "run"
    shutil.copytree(run["logdir"] / "configs", logdir / "configs")
    (logdir / "checkpoints").mkdir()
    checkpoint = torch.load(run["logdir"] / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({**checkpoint, "callbacks": RunsCode()}, logdir / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError) as error:
        load_train_script().main(["--resume", str(logdir), "--max_steps", "40"])
    assert len(str(error.value).splitlines()) == 1
    assert "last.ckpt is not a training checkpoint that can be read safely" in str(error.value)
    assert not (tmp_path / "MARKER").exists() and sorted(os.listdir(logdir)) == ["checkpoints", "configs"]


def test_export_is_small_fp16_with_ema_weights_and_loads_strictly(run):
    export = run["export"]
    saved = torch.load(export, weights_only=True)
    assert saved["global_step"] == 30
    state_dict = saved["state_dict"]
    assert not any(key.startswith("model_ema.") for key in state_dict)
    assert all(value.dtype == torch.float16 for value in state_dict.values() if value.is_floating_point())
    ema = run["checkpoint"]["state_dict"]
    name = "diffusion_model.out.2.weight"
    assert torch.equal(state_dict["model." + name], ema["model_ema." + ema_name(name)].half())
    model = load_model(export, log=lambda message: None).model  # the config beside it: <export>.yaml
    assert torch.equal(model.state_dict()["model." + name], state_dict["model." + name].float())


def test_sample_grid_is_written_with_its_captions(run):
    grids = sorted((run["logdir"] / "images").glob("step-*.png"))
    assert grids, "the end of training writes a sample grid"
    captions = grids[-1].with_suffix(".txt").read_text()
    assert "a small red circle on the left on a blue background" in captions
