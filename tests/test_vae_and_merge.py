"""--vae (a VAE file replaces the autoencoder, or one beside the checkpoint) and scripts/merge_checkpoints.py."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_script, txt2img
from ldm.checkpoint import read_checkpoint
from ldm.generate import loading
from ldm.generate.errors import UserError
from ldm.generate.run import Job, job_fields
from ldm import merging
from ldm.merging import Merge, MergeError, merge_checkpoints
from ldm.modules.lora import LoraPatcher, read_lora
from ldm.safetensors_writer import PlannedTensor, StreamingWriter
from tiny_model import tiny_model, write_tiny_checkpoint

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SCHEDULE_KEY = "alphas_cumprod"  # no "model" in its name: A1111 keeps A's


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    ckpt = write_tiny_checkpoint(folder, "tiny.safetensors", seed=0)
    other_vae = {k: v.contiguous() for k, v in tiny_model(seed=1).first_stage_model.state_dict().items()}
    vae_safetensors = folder / "other.safetensors"
    save_file(other_vae, str(vae_safetensors))
    # the CompVis release's shape: a pickle under state_dict, prefixed keys, training leftovers
    vae_pickle = folder / "other.pt"
    torch.save({"state_dict": {**{"first_stage_model." + k: v for k, v in other_vae.items()},
                               "first_stage_model.loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9)}},
               vae_pickle)
    # the reference: the same weights written into the checkpoint itself
    with_other = folder / "with_other.safetensors"
    state = load_file(str(ckpt))
    state.update({"first_stage_model." + k: v for k, v in other_vae.items()})
    save_file(state, str(with_other))
    shutil.copy(ckpt.with_suffix(".yaml"), with_other.with_suffix(".yaml"))
    return dict(folder=folder, ckpt=ckpt, vae_safetensors=vae_safetensors, vae_pickle=vae_pickle, with_other=with_other)


def decode(loaded) -> torch.Tensor:
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return loaded.use("first_stage_model").decode(z)


def load(ckpt, vae=None, low_memory=False, log=lambda line: None):
    return loading.load(str(ckpt), None, "cpu", "full", vae=vae, low_memory=low_memory, log=log)


@pytest.fixture(scope="module")
def decoded(files):
    """What the checkpoint's own autoencoder decodes, and what the other weights written into it decode."""
    return {"own": decode(load(files["ckpt"])), "other": decode(load(files["with_other"]))}


@pytest.mark.parametrize("form, low_memory", [("vae_safetensors", False), ("vae_pickle", True)])
def test_vae_decodes_exactly_as_the_same_weights_in_the_checkpoint(files, decoded, form, low_memory):
    loaded = load(files["ckpt"], vae=str(files[form]), low_memory=low_memory)
    assert torch.equal(decode(loaded), decoded["other"])
    assert not torch.equal(decoded["own"], decoded["other"])  # the VAE does change the picture
    assert loaded.vae_path == files[form] and len(loaded.vae_hash) == 10
    fields = job_fields(Job(batches=[["a circle"]]), loaded, 1, 0)
    names = list(fields)
    assert names[names.index("Model") + 1:names.index("Model") + 3] == ["VAE hash", "VAE"]
    assert fields["VAE"] == files[form].name and fields["VAE hash"] == loaded.vae_hash


def test_vae_beside_the_checkpoint_is_picked_up_and_none_turns_it_off(files, decoded, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(files["ckpt"], ckpt)
    shutil.copy(files["ckpt"].with_suffix(".yaml"), ckpt.with_suffix(".yaml"))
    shutil.copy(files["vae_safetensors"], tmp_path / "model.vae.safetensors")
    lines = []
    loaded = load(ckpt, log=lines.append)
    assert loaded.vae_path == tmp_path / "model.vae.safetensors"
    assert any("VAE beside the checkpoint" in line for line in lines)
    assert torch.equal(decode(loaded), decoded["other"])
    without = load(ckpt, vae="none")
    assert without.vae_path is None and "VAE" not in job_fields(Job(batches=[["a circle"]]), without, 1, 0)
    assert torch.equal(decode(without), decoded["own"])


def test_bad_vae_files_are_one_line_errors(files, tmp_path):
    incomplete = load_file(str(files["vae_safetensors"]))
    del incomplete["decoder.conv_out.bias"]
    save_file(incomplete, str(tmp_path / "incomplete.safetensors"))
    diffusers = {"encoder.down_blocks.0.resnets.0.norm1.weight": torch.ones(4)}
    save_file(diffusers, str(tmp_path / "diffusers.safetensors"))
    (tmp_path / "garbage.pt").write_bytes(b"not a vae at all")
    for name, words in (("incomplete.safetensors", "1 missing (decoder.conv_out.bias)"),
                        ("diffusers.safetensors", "diffusers layout"), ("garbage.pt", "not a checkpoint"),
                        ("absent.pt", "VAE file not found")):
        with pytest.raises(UserError) as error:
            load(files["ckpt"], vae=str(tmp_path / name))
        assert words in str(error.value) and "\n" not in str(error.value)


def test_txt2img_refuses_a_missing_vae_before_writing_anything(files, tmp_path):
    out = tmp_path / "out"
    result = txt2img("--ckpt", files["ckpt"], "--outdir", out, "--vae", tmp_path / "missing.safetensors")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "VAE file not found" in result.stderr and not out.exists()


# --- merging ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    paths = {label: write_tiny_checkpoint(folder, f"{label}.safetensors", seed=seed) for seed, label in enumerate("abc")}
    return folder, paths


def test_weighted_sum_and_add_difference_follow_a1111(models, tmp_path):
    _, paths = models
    a, b, c = (load_file(str(paths[label])) for label in "abc")
    merge_checkpoints(paths["a"], paths["b"], tmp_path / "ws.safetensors", multiplier=0.3, log=lambda line: None)
    merge_checkpoints(paths["a"], paths["b"], tmp_path / "ad.safetensors", method="add_difference", c=paths["c"],
                      multiplier=0.7, log=lambda line: None)
    ws, ad = load_file(str(tmp_path / "ws.safetensors")), load_file(str(tmp_path / "ad.safetensors"))
    assert set(ws) == set(a) == set(ad)
    for key in a:
        if "model" in key and a[key].is_floating_point():
            torch.testing.assert_close(ws[key], a[key] * 0.7 + b[key] * 0.3, rtol=0, atol=1e-6)
            torch.testing.assert_close(ad[key], a[key] + (b[key] - c[key]) * 0.7, rtol=0, atol=1e-6)
        else:
            assert torch.equal(ws[key], a[key]) and torch.equal(ad[key], a[key])
    assert not torch.equal(a[SCHEDULE_KEY] * 0, a[SCHEDULE_KEY])  # the kept key is a real one
    assert (tmp_path / "ws.yaml").read_bytes() == paths["a"].with_suffix(".yaml").read_bytes()
    loaded = load(tmp_path / "ws.safetensors")
    assert torch.equal(loaded.model.state_dict()[UNET_KEY], ws[UNET_KEY])


def test_mixed_formats_dtypes_keys_only_in_a_and_fp16(models, tmp_path, monkeypatch):
    _, paths = models
    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", 100)  # big tensors are merged in pieces of rows
    a = load_file(str(paths["a"]))
    b = {key: value.half() for key, value in load_file(str(paths["b"])).items() if key != UNET_KEY}
    b["only.in.b.model"] = torch.ones(3)
    torch.save({"state_dict": b}, tmp_path / "b16.ckpt")  # a half-precision pickle for B
    merge_checkpoints(paths["a"], tmp_path / "b16.ckpt", tmp_path / "m.safetensors", multiplier=0.5, log=lambda line: None)
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert "only.in.b.model" not in merged and torch.equal(merged[UNET_KEY], a[UNET_KEY])
    key = "model.diffusion_model.out.2.weight"
    assert merged[key].dtype == torch.float32  # fp32 and fp16 promote to fp32, as A1111's arithmetic does
    torch.testing.assert_close(merged[key], a[key] * 0.5 + b[key].float() * 0.5, rtol=0, atol=1e-6)
    merge_checkpoints(paths["a"], tmp_path / "b16.ckpt", tmp_path / "h.safetensors", fp16=True, log=lambda line: None)
    half = load_file(str(tmp_path / "h.safetensors"))
    assert all(t.dtype == torch.float16 for t in half.values() if t.is_floating_point())
    assert torch.equal(half[key], merged[key].half())


def test_inpainting_a_keeps_its_extra_channels_and_the_reverse_is_refused(models, tmp_path):
    _, paths = models
    a, b = load_file(str(paths["a"])), load_file(str(paths["b"]))
    wide = torch.randn(a[UNET_KEY].shape[0], 9, *a[UNET_KEY].shape[2:])
    save_file({**a, UNET_KEY: wide}, str(tmp_path / "inpaint.safetensors"))
    merge_checkpoints(tmp_path / "inpaint.safetensors", paths["b"], tmp_path / "m.safetensors", multiplier=0.25,
                      log=lambda line: None)
    merged = load_file(str(tmp_path / "m.safetensors"))[UNET_KEY]
    torch.testing.assert_close(merged[:, :4], wide[:, :4] * 0.75 + b[UNET_KEY] * 0.25, rtol=0, atol=1e-6)
    assert torch.equal(merged[:, 4:], wide[:, 4:])
    with pytest.raises(MergeError, match="A must be the inpainting model"):
        merge_checkpoints(paths["b"], tmp_path / "inpaint.safetensors", tmp_path / "r.safetensors", log=lambda line: None)
    assert not (tmp_path / "r.safetensors").exists()


def test_baked_vae_replaces_the_autoencoder(models, files, tmp_path):
    _, paths = models
    merge_checkpoints(paths["a"], paths["b"], tmp_path / "v.safetensors", vae=files["vae_pickle"], log=lambda line: None)
    merged = load_file(str(tmp_path / "v.safetensors"))
    for key, value in load_file(str(files["vae_safetensors"])).items():
        assert torch.equal(merged["first_stage_model." + key], value)


def test_no_partial_file_when_a_step_fails_and_no_overwrite(models, tmp_path, monkeypatch):
    _, paths = models
    out = tmp_path / "out.safetensors"
    calls = []
    original = Merge.tensor

    def failing(self, key, dtype):
        calls.append(key)
        if len(calls) == 20:
            raise OSError(28, "No space left on device")
        return original(self, key, dtype)

    monkeypatch.setattr(Merge, "tensor", failing)
    with pytest.raises(MergeError, match="No space left on device"):
        merge_checkpoints(paths["a"], paths["b"], out, log=lambda line: None)
    assert list(tmp_path.iterdir()) == [] and len(calls) == 20
    monkeypatch.undo()
    out.write_bytes(b"the user's file")
    with pytest.raises(MergeError, match="exists: pass --overwrite"):
        merge_checkpoints(paths["a"], paths["b"], out, log=lambda line: None)
    assert out.read_bytes() == b"the user's file"
    merge_checkpoints(paths["a"], paths["b"], out, overwrite=True, log=lambda line: None)
    assert read_checkpoint(out)[0].keys() == load_file(str(paths["a"])).keys()


def test_merge_script_refuses_bad_input_in_one_line(models, tmp_path):
    _, paths = models
    out = tmp_path / "m.safetensors"
    result = run_script("merge_checkpoints", "--a", paths["a"], "--b", paths["b"], "--method", "add_difference",
                        "--out", out)
    assert result.returncode == 2 and "needs a third model C" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run_script("merge_checkpoints", "--a", paths["a"], "--b", paths["b"], "--out", out, "-M", "0.25")
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "merged" in result.stdout


def test_streaming_writer_is_read_back_by_the_safetensors_package(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 3).half(),
               "i64": torch.arange(5), "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "f64": torch.randn(3, dtype=torch.float64), "u8": torch.arange(9, dtype=torch.uint8)}
    planned = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with open(tmp_path / "w.safetensors", "wb") as f:
        writer = StreamingWriter(f, planned, {"format": "pt"})
        for entry in writer.order:
            writer.write(entry.name, tensors[entry.name])
        writer.finish()
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    ours, metadata = read_checkpoint(tmp_path / "w.safetensors")
    assert all(torch.equal(ours[k], v) for k, v in tensors.items()) and metadata["format"] == "pt"
    with open(tmp_path / "x.safetensors", "wb") as f:
        writer = StreamingWriter(f, planned)
        with pytest.raises(ValueError, match="where"):
            writer.write("not-planned", torch.zeros(1))


def test_baked_lora_equals_the_lora_applied_to_the_merge(models, tmp_path):
    _, paths = models
    layer, target = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    generator = torch.Generator().manual_seed(5)
    save_file({f"{layer}.lora_down.weight": torch.randn(2, 32, generator=generator),
               f"{layer}.lora_up.weight": torch.randn(32, 2, generator=generator), f"{layer}.alpha": torch.tensor(1.0)},
              str(tmp_path / "style.safetensors"))
    merge_checkpoints(paths["a"], paths["b"], tmp_path / "plain.safetensors", log=lambda line: None)
    merge_checkpoints(paths["a"], paths["b"], tmp_path / "baked.safetensors", loras=[(tmp_path / "style.safetensors", 0.8)],
                      log=lambda line: None)
    plain, baked = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "baked.safetensors"))
    model = load(tmp_path / "plain.safetensors").model
    LoraPatcher(model, log=lambda line: None).apply([(read_lora(tmp_path / "style.safetensors"), 0.8, 0.8)])
    assert torch.equal(baked[target], model.state_dict()[target]) and not torch.equal(baked[target], plain[target])
    assert all(torch.equal(baked[key], plain[key]) for key in plain if key != target)
    (tmp_path / "broken.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(MergeError):
        merge_checkpoints(paths["a"], paths["b"], tmp_path / "x.safetensors", loras=[(tmp_path / "broken.safetensors", 1)],
                          log=lambda line: None)
    assert not (tmp_path / "x.safetensors").exists()
