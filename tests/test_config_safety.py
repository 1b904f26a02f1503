"""Configs never run code: a target outside ldm (and the allow-list) is refused before anything is imported or
built, at every depth the original configs nest targets, through --config, the YAML beside a checkpoint and
train.py; --trust_config lets one's own classes be built; every shipped and original config still builds."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import ldm.checkpoint
import ldm.training
from conftest import REPO
from ldm.checkpoint import CheckpointError, load_model, parameters_on_meta
from ldm.generate import loading
from ldm.generate.errors import UserError
from ldm.generate.options import run_cli
from ldm.models.diffusion import ddpm
from ldm.models.diffusion.ddpm_depth import LatentDepth2ImageDiffusion
from ldm.models.diffusion.ddpm_variants import LatentInpaintDiffusion, LatentUpscaleDiffusion
from ldm.util import (ConfigError, check_config_targets, get_obj_from_str, instantiate_from_config, read_config,
                      trusted_configs)
from tiny_model import TINY_CONFIG, write_tiny_checkpoint

TRAIN_SCRIPT = REPO / "scripts" / "train.py"
TXT2IMG_SCRIPT = REPO / "scripts" / "txt2img.py"
ORIGINAL_CONFIGS = Path(__file__).parent / "data" / "original-configs"
EVIL_MODULE = "evil_module"

# Where the original configs (and our training configs) nest targets, in the tiny model's config.
MODEL_PLACES = ["model", "model.params.unet_config", "model.params.first_stage_config",
                "model.params.first_stage_config.params.lossconfig", "model.params.cond_stage_config",
                "model.params.low_scale_config", "model.params.depth_stage_config", "model.params.scheduler_config"]
TRAINING_PLACES = ["data", "data.params.train", "data.params.train.params.image_transforms[0]",
                   "data.params.train.params.postprocess", "lightning.callbacks.image_logger",
                   "model.params.scheduler_config", "model.params.cond_stage_config"]

# The smallest training run config that works over the tiny model (as a second --base).
TRAINING_CONFIG = {
    "data": {"target": "ldm.training.DataModuleFromConfig",
             "params": {"batch_size": 2, "num_workers": 0,
                        "train": {"target": "ldm.data.shapes.ShapesDataset",
                                  "params": {"size": 2, "resolution": 32, "seed": 0}}}},
    "training": {"sample_every_n_steps": 0, "checkpoint_every_n_steps": 1000},
}


# --- the poisons ------------------------------------------------------------------------------------------------
def plant_evil_module(folder: Path, marker: Path):
    """A module that creates `marker` when imported, with a class that creates it when built."""
    (folder / f"{EVIL_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n\n"
        f"class Payload:\n    def __init__(self, **params):\n        Path({str(marker)!r}).touch()\n")


def poisons(marker: Path) -> dict:
    """target -> the params with which it would create `marker` if it were ever called."""
    return {
        "os.system": {"command": f"touch {marker}"},
        "subprocess.Popen": {"args": ["touch", str(marker)]},
        "builtins.exec": {},  # exec takes no keyword arguments: refused by name all the same
        f"{EVIL_MODULE}.Payload": {},
    }


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The file a poison would create; the evil module is importable, so a refusal must come before importing."""
    plant_evil_module(tmp_path, tmp_path / "marker")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "marker"
    assert not (tmp_path / "marker").exists(), "a config target ran"
    assert EVIL_MODULE not in sys.modules, "a refused module was imported"


def set_place(config, place: str, node):
    """Put `node` at `place` ("a.b.c", or "a.b[0]": the one item of a new list), creating mappings on the way."""
    path, _, index = place.partition("[")
    keys = path.split(".")
    parent = config
    for key in keys[:-1]:
        if parent.get(key) is None:
            parent[key] = {}
        parent = parent[key]
    parent[keys[-1]] = [node] if index else node


def poisoned_copy(source: Path, destination: Path, place: str, target: str, params: dict, extra=None) -> Path:
    config = OmegaConf.merge(OmegaConf.load(source), OmegaConf.create(extra or {}))
    set_place(config, place, {"target": target, "params": params})
    OmegaConf.save(config, destination)
    return destination


def assert_one_line(message: str, *fragments: str):
    assert "\n" not in message.strip() and "Traceback" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.fixture
def builds(monkeypatch):
    """The targets the loader and training build (refusals must come before the first)."""
    built = []

    def recording(config, **overrides):
        built.append(config.get("target"))
        return instantiate_from_config(config, **overrides)

    monkeypatch.setattr(ldm.checkpoint, "instantiate_from_config", recording)
    monkeypatch.setattr(ldm.training, "instantiate_from_config", recording)
    return built


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


# --- in-process: the loader the scripts use, every target at every depth ---------------------------------------
@pytest.mark.parametrize("place", MODEL_PLACES)
@pytest.mark.parametrize("target", list(poisons(Path("m"))))
@pytest.mark.parametrize("config_from", ["--config", "beside the checkpoint"])
def test_loader_refuses_a_target_outside_ldm_before_building_anything(tmp_path, marker, builds, tiny_ckpt, place,
                                                                       target, config_from):
    ckpt = tmp_path / "downloaded.safetensors"
    ckpt.symlink_to(tiny_ckpt)
    config = tmp_path / ("custom.yaml" if config_from == "--config" else "downloaded.yaml")
    poisoned_copy(TINY_CONFIG, config, place, target, poisons(marker)[target])
    with pytest.raises(CheckpointError) as error:
        load_model(ckpt, config if config_from == "--config" else None)
    assert_one_line(str(error.value), str(config), f"{place}.target '{target}' is refused", "--trust_config")
    assert builds == []


@pytest.mark.parametrize("place", TRAINING_PLACES)
@pytest.mark.parametrize("target", list(poisons(Path("m"))))
def test_training_refuses_a_target_outside_ldm_and_creates_no_log_dir(tmp_path, marker, builds, place, target):
    base = poisoned_copy(TINY_CONFIG, tmp_path / "train.yaml", place, target, poisons(marker)[target],
                         extra=TRAINING_CONFIG)
    options = runpy.run_path(str(TRAIN_SCRIPT))["parse_args"](["--base", str(base), "--logdir", str(tmp_path / "logs")])
    with pytest.raises(UserError) as error:
        ldm.training.train(options)
    assert_one_line(str(error.value), str(base), f"{place}.target '{target}' is refused", "--trust_config")
    assert builds == [] and not (tmp_path / "logs").exists()


def test_a_target_set_on_the_command_line_is_refused_too(tmp_path, marker, capsys, monkeypatch):
    base = tmp_path / "train.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY_CONFIG), TRAINING_CONFIG), base)
    exit_status, stderr = train_in_process(tmp_path, capsys, monkeypatch, "--base", base, "--set",
                                           f"model.params.unet_config.target={EVIL_MODULE}.Payload")
    assert exit_status == 2
    assert_one_line(stderr, "--set", f"model.params.unet_config.target '{EVIL_MODULE}.Payload' is refused")


@pytest.mark.parametrize("target,refusal", [
    ("ldm.util.get_obj_from_str", "is refused"),  # a function of ours: not a class
    ("ldm.util", "is refused"),                   # a module
    ("ldm.util.Path", "is refused"),              # a class merely imported into an ldm module
    ("ldm.util.importlib", "is refused"),
    ("ldm.no_such_module.Model", "cannot be imported"),
    ("__import__('os').system", "is not a dotted name"),
    ("LatentDiffusion", "is not a dotted name"),
    (".models.diffusion.ddpm.LatentDiffusion", "is not a dotted name"),
    (42, "is not a dotted name"),
])
def test_only_classes_defined_in_ldm_are_resolved(target, refusal):
    with pytest.raises(ConfigError) as error:
        check_config_targets(OmegaConf.create({"model": {"params": {"unet_config": {"target": target}}}}),
                             source="c.yaml")
    assert_one_line(str(error.value), "config c.yaml: model.params.unet_config.target", refusal)


def test_constructors_building_nested_configs_are_held_to_the_same_rules(marker):
    """Even what the tree check never saw (a constructor's own instantiate call) is refused by name."""
    config = OmegaConf.load(TINY_CONFIG).model
    set_place(config, "params.cond_stage_config", {"target": f"{EVIL_MODULE}.Payload"})
    with pytest.raises(ConfigError, match=f"'{EVIL_MODULE}.Payload' is refused"):
        with parameters_on_meta():
            instantiate_from_config(config)


def test_trust_builds_any_class_in_nested_constructors_and_ends_with_its_block(tmp_path, monkeypatch):
    (tmp_path / "my_research.py").write_text("import torch\n\n\nclass MyLoss(torch.nn.Module):\n    built = 0\n\n"
                                             "    def __init__(self, weight):\n        super().__init__()\n"
                                             "        MyLoss.built += weight\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = OmegaConf.load(TINY_CONFIG).model
    config.params.first_stage_config.params.lossconfig = {"target": "my_research.MyLoss", "params": {"weight": 1}}
    with trusted_configs(), parameters_on_meta():
        model = instantiate_from_config(config)
    assert type(model.first_stage_model.loss).__name__ == "MyLoss" and model.first_stage_model.loss.built == 1
    with pytest.raises(ConfigError, match="is refused"):
        get_obj_from_str("my_research.MyLoss")


def test_a_misspelt_parameter_names_its_target():
    config = OmegaConf.load(TINY_CONFIG).model
    config.params.cond_stage_config.params.n_layers = 2
    with pytest.raises(ConfigError) as error, parameters_on_meta():
        instantiate_from_config(config)
    assert_one_line(str(error.value), "ldm.modules.encoders.modules.BPETextTransformer", "n_layers")


@pytest.mark.parametrize("content,problem", [
    (b"model: [unclosed\n", "is not valid YAML"),
    (b"- model\n- data\n", "is not a mapping"),
    (b"\xff\xfe\x00model", "is not a text (UTF-8) YAML file"),
    (b"model: !!python/object/apply:os.system ['touch MARKER']\n", "is not valid YAML"),  # YAML's own code tags
])
def test_an_unreadable_config_is_one_line(tmp_path, marker, content, problem):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content.replace(b"MARKER", str(marker).encode()))
    with pytest.raises(ConfigError) as error:
        read_config(path)
    assert_one_line(str(error.value), str(path), problem)


# --- what must still load -----------------------------------------------------------------------------------
SHIPPED_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: str(path.relative_to(REPO / "configs")))
def test_every_shipped_config_passes_the_check_and_builds(path):
    config = read_config(path)
    # Training configs are checked whole, as train.py does; the SD 2.x inpainting config keeps the original's
    # data section (a LAION loader this project does not have), never read by the generation scripts.
    check_config_targets(config if "training" in config else config.model, source=path)
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    assert type(model).__module__.startswith("ldm.")


ORIGINAL_MODEL_CLASSES = {
    "compvis-v1-inference.yaml": ddpm.LatentDiffusion,
    "stability-v2-inference.yaml": ddpm.LatentDiffusion,
    "stability-v2-inference-v.yaml": ddpm.LatentDiffusion,
    "stability-v2-inpainting-inference.yaml": LatentInpaintDiffusion,
    "stability-v2-midas-inference.yaml": LatentDepth2ImageDiffusion,
    "stability-x4-upscaling.yaml": LatentUpscaleDiffusion,
}


@pytest.mark.parametrize("name", list(ORIGINAL_MODEL_CLASSES))
def test_the_original_configs_build_our_classes(name):
    config = read_config(ORIGINAL_CONFIGS / name)
    check_config_targets(config.model, "model", name)
    with parameters_on_meta():
        model = instantiate_from_config(config.model, use_ema=False)
    assert type(model) is ORIGINAL_MODEL_CLASSES[name]


def test_the_variant_names_are_aliases_not_attributes_of_ddpm():
    assert get_obj_from_str("ldm.models.diffusion.ddpm.LatentInpaintDiffusion") is LatentInpaintDiffusion
    assert not hasattr(ddpm, "LatentInpaintDiffusion")  # the base class's module does not know its subclasses


# --- train.py's rules for bad input (in-process through its command line) ------------------------------------
def train_in_process(tmp_path, capsys, monkeypatch, *args) -> tuple[int, str]:
    """scripts/train.py's command line run here: (exit status, stderr); no log dir may have been created."""
    logs = tmp_path / "logs"
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args), "--logdir", str(logs)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(runpy.run_path(str(TRAIN_SCRIPT))["command_line"])
    assert not logs.exists(), "a refused run created its log dir"
    return exit_.value.code, capsys.readouterr().err


def bad_training_inputs(tmp_path) -> dict:
    folder_without_checkpoint = tmp_path / "old-run"
    (folder_without_checkpoint / "configs").mkdir(parents=True)
    good = tmp_path / "good.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY_CONFIG), TRAINING_CONFIG), good)
    model_only = tmp_path / "model-only.yaml"
    OmegaConf.save(OmegaConf.load(TINY_CONFIG), model_only)
    return {  # case: (arguments, what the line says)
        "missing --base": (["--base", tmp_path / "nope.yaml"], ["config not found", "nope.yaml"]),
        "a folder as --base": (["--base", tmp_path], ["is a folder"]),
        "no --base": ([], ["give --base CONFIG"]),
        "no data section": (["--base", model_only], ["no 'data:' section"]),
        "--set without =": (["--base", good, "--set", "model.base_learning_rate"], ["is not KEY=VALUE"]),
        "--set bad YAML": (["--base", good, "--set", "model.params.channels=[4"], ["not valid YAML"]),
        "--resume nowhere": (["--resume", tmp_path / "nothing"], ["no such checkpoint or log dir"]),
        "--resume without a checkpoint": (["--resume", folder_without_checkpoint], ["last.ckpt is missing"]),
        "bad --first_stage_ckpt": (["--base", good, "--first_stage_ckpt", tmp_path / "ae.ckpt"],
                                   ["--first_stage_ckpt", "not found"]),
        "unknown option": (["--base", good, "--epochs", "3"], ["unrecognized arguments"]),
    }


def test_bad_training_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, monkeypatch):
    for case, (args, fragments) in bad_training_inputs(tmp_path).items():
        exit_status, stderr = train_in_process(tmp_path, capsys, monkeypatch, *args)
        assert exit_status == 2, case
        assert_one_line(stderr, *fragments)


# --- the scripts, end to end (one process each) -------------------------------------------------------------
def run_script(script: Path, *args, pythonpath: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")]),
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache")}
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=pythonpath)


def assert_refused_by_the_script(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_one_line(result.stderr, *fragments)


def txt2img_args(ckpt: Path, outdir: Path, *extra):
    return ("--ckpt", ckpt, "--outdir", outdir, "--ddim_steps", 2, "--H", 64, "--W", 64, "--n_samples", 1,
            "--n_iter", 1, "--skip_grid", *extra)


def test_txt2img_refuses_a_poisoned_config(tmp_path, tiny_ckpt, marker):
    config = poisoned_copy(TINY_CONFIG, tmp_path / "model.yaml", "model.params.cond_stage_config",
                           f"{EVIL_MODULE}.Payload", {})
    result = run_script(TXT2IMG_SCRIPT, *txt2img_args(tiny_ckpt, tmp_path / "out", "--config", config),
                        pythonpath=tmp_path)
    assert_refused_by_the_script(result, str(config), f"model.params.cond_stage_config.target '{EVIL_MODULE}.Payload'",
                                 "--trust_config")


def test_txt2img_refuses_a_poisoned_config_beside_the_checkpoint(tmp_path, tiny_ckpt, marker):
    ckpt = tmp_path / "downloaded.safetensors"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    sidecar = poisoned_copy(TINY_CONFIG, tmp_path / "downloaded.yaml", "model.params.unet_config", "os.system",
                            poisons(marker)["os.system"])
    result = run_script(TXT2IMG_SCRIPT, *txt2img_args(ckpt, tmp_path / "out"), pythonpath=tmp_path)
    assert_refused_by_the_script(result, str(sidecar), "model.params.unet_config.target 'os.system'",
                                 "--trust_config")


def test_train_script_refuses_a_poisoned_config(tmp_path, marker):
    base = poisoned_copy(TINY_CONFIG, tmp_path / "train.yaml", "data.params.train", "subprocess.Popen",
                         poisons(marker)["subprocess.Popen"], extra=TRAINING_CONFIG)
    result = run_script(TRAIN_SCRIPT, "--base", base, "--logdir", tmp_path / "logs", "--max_steps", 1,
                        pythonpath=tmp_path)
    assert_refused_by_the_script(result, str(base), "data.params.train.target 'subprocess.Popen'", "--trust_config")
    assert not (tmp_path / "logs").exists()


def test_trust_config_reaches_the_loader_and_builds_ones_own_class(tmp_path, tiny_ckpt, monkeypatch):
    built = tmp_path / "built"
    (tmp_path / "my_research_loss.py").write_text(
        f"import pathlib\nimport torch\n\n\nclass MyLoss(torch.nn.Identity):\n    def __init__(self):\n"
        f"        super().__init__()\n        pathlib.Path({str(built)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = poisoned_copy(TINY_CONFIG, tmp_path / "mine.yaml", "model.params.first_stage_config.params.lossconfig",
                           "my_research_loss.MyLoss", {})
    parse_txt2img_args = runpy.run_path(str(TXT2IMG_SCRIPT))["parse_args"]
    with pytest.raises(UserError, match="'my_research_loss.MyLoss' is refused"):
        loading.load_from_args(parse_txt2img_args(["--ckpt", str(tiny_ckpt), "--config", str(config)]))
    assert not built.exists()
    loaded = loading.load_from_args(parse_txt2img_args(["--ckpt", str(tiny_ckpt), "--config", str(config),
                                                        "--trust_config", "--device", "cpu"]), log=lambda _: None)
    assert built.exists() and type(loaded.model.first_stage_model.loss).__name__ == "MyLoss"
