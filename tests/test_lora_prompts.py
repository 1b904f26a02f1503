"""LoRAs in prompts (A1111's <lora:name:weight> tags), on the command line (--lora, --lora_dir,
--skip_bad_lora) and in the infotext ("Lora hashes"); the LoRA maths itself is tests/test_lora.py's."""
import hashlib

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import loaded_tiny, txt2img
from ldm.generate.errors import UserError
from ldm.generate.extra_networks import (LoraFolder, LoraTag, PromptNetworks, cli_lora, lora_short_hash,
                                         parse_prompt)
from tiny_model import write_tiny_checkpoint

# (prompt, text the encoder sees, LoRAs asked for as (name, te weight, unet weight), tags of other kinds)
PARSE_TABLE = [
    ("a cat", "a cat", [], []),
    ("a cat <lora:style:0.8>", "a cat ", [("style", 0.8, 0.8)], []),
    ("<lora:style>a cat", "a cat", [("style", 1.0, 1.0)], []),
    ("a cat <lora:style:0.8:0.5>", "a cat ", [("style", 0.8, 0.5)], []),  # A1111: te first, then unet
    ("a cat <lora:style:te=0.3:unet=0.6>", "a cat ", [("style", 0.3, 0.6)], []),
    ("a cat <lora:style:1:unet=0>", "a cat ", [("style", 1.0, 0.0)], []),
    ("a cat <lora:style:te=0.25>", "a cat ", [("style", 0.25, 0.25)], []),  # unet follows te
    ("<lora:style:0.5:te=2>", "", [("style", 2.0, 2.0)], []),  # a named te= wins over the position
    ("<lyco:locon_a:0.7>, dog", ", dog", [("locon_a", 0.7, 0.7)], []),
    ("<lora:a:1>, <lora:b:-0.5> x", ",  x", [("a", 1.0, 1.0), ("b", -0.5, -0.5)], []),
    ("<lora: spaced name : 0.5 >", "", [("spaced name", 0.5, 0.5)], []),
    ("<lora:style:.5>", "", [("style", 0.5, 0.5)], []),
    ("<lora:style:1e-1>", "", [("style", 0.1, 0.1)], []),
    ("<hypernet:anime:1> girl", " girl", [], ["<hypernet:anime:1>"]),
    ("(masterpiece:1.2) <lora:x:0.6> [bad]", "(masterpiece:1.2)  [bad]", [("x", 0.6, 0.6)], []),
    ("a <b> c", "a <b> c", [], []),  # no colon: not a tag
    ("<lora:>", "<lora:>", [], []),  # nothing after the colon: not a tag for A1111 either
    ("<lo-ra:x:1>", "<lo-ra:x:1>", [], []),  # the kind must be a word
    (r"\(x\) <lora:x:1>", r"\(x\) ", [("x", 1.0, 1.0)], []),
    ("<lora:a:1><lora:a:0.5>", "", [("a", 1.0, 1.0), ("a", 0.5, 0.5)], []),
    ("multi\nline <lora:x:1>\nprompt", "multi\nline \nprompt", [("x", 1.0, 1.0)], []),
]


@pytest.mark.parametrize("prompt, text, loras, ignored", PARSE_TABLE)
def test_tags_parse_as_a1111_reads_them(prompt, text, loras, ignored):
    parsed = parse_prompt(prompt)
    assert parsed.text == text
    assert parsed.loras == tuple(LoraTag(*lora) for lora in loras)
    assert list(parsed.ignored) == ignored


@pytest.mark.parametrize("prompt, problem", [
    ("<lora:style:abc>", "'abc' is not a number"),
    ("<lora:style:nan>", "not a finite number"),
    ("<lora:style:1:inf>", "not a finite number"),
    ("<lora::1>", "names no LoRA"),
    ("<lora:style:1:1:8>", "a fourth value '8' is not supported"),
    ("<lora:style:dyn=8>", "dyn= is not supported"),
])
def test_a_bad_tag_is_one_line_naming_it(prompt, problem):
    with pytest.raises(UserError) as caught:
        parse_prompt(prompt)
    message = str(caught.value)
    assert problem in message and "\n" not in message
    assert message.startswith(prompt.split(">")[0])


@pytest.mark.parametrize("value, path, weight", [
    ("x.safetensors", "x.safetensors", 1.0),
    ("x.safetensors:0.5", "x.safetensors", 0.5),
    ("dir/x.pt:-1", "dir/x.pt", -1.0),
    ("C:/loras/x.safetensors", "C:/loras/x.safetensors", 1.0),
    ("C:/loras/x.safetensors:0.25", "C:/loras/x.safetensors", 0.25),
])
def test_cli_lora_path_and_weight(value, path, weight):
    assert cli_lora(value) == (type(cli_lora(value)[0])(path), weight)


@pytest.fixture
def lora_files(tmp_path):
    folder = tmp_path / "Lora"
    (folder / "sub").mkdir(parents=True)
    save_file({"t": torch.ones(2)}, str(folder / "plain.safetensors"))
    save_file({"t": torch.zeros(2)}, str(folder / "sub" / "nested.safetensors"), metadata={"ss_output_name": "alias"})
    save_file({"t": torch.zeros(3)}, str(folder / "recorded.safetensors"), metadata={"sshs_model_hash": "ab" * 32})
    (folder / "old.pt").write_bytes(b"not really a pickle")
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def test_names_are_file_stems_in_subfolders_or_aliases(lora_files):
    folder = LoraFolder(lora_files)
    assert folder.find("plain") == lora_files / "plain.safetensors"
    assert folder.find("nested") == lora_files / "sub" / "nested.safetensors"
    assert folder.find("alias") == lora_files / "sub" / "nested.safetensors"
    assert folder.find("old") == lora_files / "old.pt"
    with pytest.raises(UserError, match=r"no LoRA named 'notes' in .*Lora: put notes.safetensors there"):
        folder.find("notes")
    with pytest.raises(UserError, match="which does not exist"):
        LoraFolder(lora_files / "missing").find("plain")


def test_short_hash_of_each_file_kind(lora_files):
    """A1111's: the sha256 of the tensor data after a .safetensors header (kohya's "addnet" hash), or the
    file's sshs_model_hash when it records one, or of a whole .pt; 12 digits."""
    data = (lora_files / "plain.safetensors").read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert lora_short_hash(lora_files / "plain.safetensors") == hashlib.sha256(body).hexdigest()[:12]
    assert lora_short_hash(lora_files / "recorded.safetensors", {"sshs_model_hash": "ab" * 32}) == "ab" * 6
    whole = hashlib.sha256(b"not really a pickle").hexdigest()[:12]
    assert lora_short_hash(lora_files / "old.pt") == whole


# --- the run: a kohya-format LoRA for the tiny model -------------------------------------------------------
TINY_LORA_LAYERS = {  # kohya name -> (out, in) of the tiny model's weight it changes
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": (64, 32),
    "lora_te_transformer_resblocks_0_mlp_c_fc": (128, 32),  # the tiny text encoder has no CLIP names: its own
}


def write_tiny_lora(path, seed=0, rank=4, layers=TINY_LORA_LAYERS):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (rows, columns) in layers.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, columns, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_output_name": path.stem})
    return path


def run_tiny(loaded, tmp_path, batches, networks=None, **settings):
    """The samples of a txt2img run (decoded pictures as arrays) and their infotexts; fixed_code: every batch
    has the first batch's noise, so batches compare with each other."""
    from ldm.generate.output import OutputFolder
    from ldm.generate.txt2img import Txt2ImgJob, run_txt2img
    import numpy as np
    job = Txt2ImgJob(batches=batches, steps=2, height=64, width=64, seed=3, fixed_code=True, save_grid=False,
                     networks=networks, **settings)
    lines = []
    report = run_txt2img(job, loaded, OutputFolder(tmp_path / f"out{len(list(tmp_path.iterdir()))}"), log=lines.append)
    pictures, texts = [], []
    for path in report.saved:
        with Image.open(path) as image:
            pictures.append(np.asarray(image.convert("RGB")).copy())
            texts.append(image.text["parameters"])
    return pictures, texts, lines


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("Lora")
    write_tiny_lora(folder / "tiny_style.safetensors")
    return folder


def test_weights_change_the_picture_zero_does_not_and_the_model_is_restored_bit_for_bit(lora_dir, tmp_path):
    loaded = loaded_tiny()
    before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    networks = PromptNetworks(lora_dir, log=lambda line: None)
    # the weight-0 prompt is the plain one once its tag is taken out: the text encoder never sees the tag
    prompts = [["a red circle "], ["a red circle <lora:tiny_style:1>"], ["a red circle <lora:tiny_style:0>"],
               ["a red circle <lora:tiny_style:0:1>"], ["a red circle "]]
    pictures, texts, lines = run_tiny(loaded, tmp_path, prompts, networks, watermark=False)
    plain, full, zero, unet_only, plain_again = pictures
    assert (plain != full).any() and (plain != unet_only).any() and (full != unet_only).any()
    assert (plain == zero).all() and (plain == plain_again).all()  # restored between batches too
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    expected_hash = lora_short_hash(lora_dir / "tiny_style.safetensors")
    assert texts[1].splitlines()[0] == "a red circle <lora:tiny_style:1>"  # the prompt as written
    assert f'Lora hashes: "tiny_style: {expected_hash}"' in texts[1]  # quoted, as A1111 quotes a value with ':'
    assert "Lora hashes" not in texts[0] and "Lora hashes" not in texts[4]
    fields = list(_fields(texts[1]))
    assert fields.index("Lora hashes") == fields.index("RNG") + 1


def _fields(text):
    from ldm.generate.infotext import parse_parameters
    return parse_parameters(text)[2]


def test_a_negative_prompts_tags_are_taken_out_of_its_text(lora_dir, tmp_path):
    loaded = loaded_tiny()
    networks = PromptNetworks(lora_dir, log=lambda line: None)
    tagged, texts, _ = run_tiny(loaded, tmp_path, [["a"]], networks, watermark=False,
                                negative_prompt="<lora:tiny_style:0>blurry")
    plain, _, _ = run_tiny(loaded, tmp_path, [["a"]], networks, watermark=False, negative_prompt="blurry")
    assert (tagged[0] == plain[0]).all()
    assert texts[0].splitlines()[1] == "Negative prompt: <lora:tiny_style:0>blurry"


def test_a_file_for_another_model_is_refused_before_sampling_or_skipped(tmp_path, monkeypatch):
    folder = tmp_path / "Lora"
    write_tiny_lora(folder / "wide.safetensors", layers={
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)})
    write_tiny_lora(folder / "foreign.safetensors", layers={"lora_unet_not_a_layer_of_ours": (8, 8)})
    sampled = []
    monkeypatch.setattr("ldm.generate.run.sample", lambda *args, **kwargs: sampled.append(1))
    for name, problem in (("wide", "does not fit this model"), ("foreign", "matches no layer of this model")):
        with pytest.raises(UserError, match=problem):
            run_tiny(loaded_tiny(), tmp_path, [[f"x <lora:{name}:1>"]], PromptNetworks(folder))
    assert not sampled
    monkeypatch.undo()
    lines = []
    loaded = loaded_tiny()
    pictures, texts, _ = run_tiny(loaded, tmp_path, [["x <lora:wide:1> <lora:foreign:1>"], ["x"]],
                                  PromptNetworks(folder, skip_bad=True, log=lines.append), watermark=False)
    assert (pictures[0] == pictures[1]).all() and "Lora hashes" not in texts[0]
    assert sum("going on without it" in line for line in lines) == 2


# --- the command line --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("case", ["missing name", "corrupt file", "bad weight"])
def test_a_bad_lora_exits_2_with_one_line_before_anything_is_written(ckpt, lora_dir, tmp_path, case):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    extra, expected = {
        "missing name": (["--prompt", "a <lora:nowhere:1>"], f"no LoRA named 'nowhere' in {lora_dir}"),
        "corrupt file": (["--lora", f"{corrupt}:0.5"], str(corrupt)),
        "bad weight": (["--prompt", "a <lora:tiny_style:heavy>"], "<lora:tiny_style:heavy>: 'heavy' is not a number"),
    }[case]
    out = tmp_path / "out"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--lora_dir", lora_dir, "--ddim_steps", 2, *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_skip_bad_lora_goes_on_and_the_infotext_names_what_was_used(ckpt, lora_dir, tmp_path):
    out = tmp_path / "out"
    extra_file = write_tiny_lora(tmp_path / "elsewhere" / "extra.safetensors", seed=1)
    prompt = "a red circle <lora:nowhere:1> <lora:tiny_style:0.5:0.25>"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--lora_dir", lora_dir, "--ddim_steps", 2, "--H", 64, "--W", 64,
                     "--n_samples", 1, "--n_iter", 1, "--skip_grid", "--prompt", prompt, "--lora", f"{extra_file}:0.5",
                     "--skip_bad_lora")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"no LoRA named 'nowhere' in {lora_dir}") == 1
    [sample] = (out / "samples").iterdir()
    with Image.open(sample) as image:
        text = image.text["parameters"]
    assert text.splitlines()[0] == prompt
    hashes = f"extra: {lora_short_hash(extra_file)}, tiny_style: {lora_short_hash(lora_dir / 'tiny_style.safetensors')}"
    assert _fields(text)["Lora hashes"] == hashes


def test_lowmem_converts_each_component_with_its_lora(ckpt, lora_dir, tmp_path):
    """--lowmem converts a component from the checkpoint's tensors when it is used: the merged ones."""
    from ldm.generate.loading import load
    pictures = {}
    for low_memory in (False, True):
        loaded = load(str(ckpt), None, "cpu", "full", log=lambda line: None, low_memory=low_memory)
        pictures[low_memory], _, _ = run_tiny(loaded, tmp_path, [["a <lora:tiny_style:1>"], ["a"]],
                                              PromptNetworks(lora_dir), watermark=False)
    assert (pictures[True][0] != pictures[True][1]).any()
    assert all((ours == reference).all() for ours, reference in zip(pictures[True], pictures[False]))
