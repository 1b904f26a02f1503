"""Textual-inversion embeddings: the file formats, safety, the folder, the chunks, and the numbers.

The numeric check loads a random A1111-format embedding into transformers' CLIPTextModel with
diffusers' own ``load_textual_inversion`` (its mixin on a minimal object, as a pipeline calls it) and
compares the text embedding with our SD 1.x encoder's, full size, random weights, fp32.
"""

import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from helpers import build_random, build_reference_clip, loaded_tiny, relative_error, txt2img  # noqa: E402
from ldm.generate.conditioning import Conditioner  # noqa: E402
from ldm.generate.run import Job, job_fields  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_model import tiny_model, write_tiny_checkpoint  # noqa: E402
from ldm.modules.embeddings import (  # noqa: E402
    EmbeddingDatabase,
    EmbeddingError,
    load_embeddings,
    read_embedding,
    ti_hashes,
    token_vector_size,
)
from ldm.modules.encoders.tokenizer import END_TOKEN, SD1_PAD_TOKEN, get_tokenizer  # noqa: E402
from ldm.modules.prompt_encoding import CHUNK_LENGTH, prompt_chunks  # noqa: E402

SD1_SIZE, SD2_SIZE = 768, 1024


def random_vectors(n_vectors: int, size: int = SD1_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_vectors, size, generator=torch.Generator().manual_seed(seed))


def save_a1111_pt(path, vectors):
    """What A1111's Embedding.save writes (the vectors a leaf tensor that required grad in training)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                "name": path.stem, "step": 1500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}, path)


WRITERS = {
    "a1111.pt": save_a1111_pt,
    "old_emb_params.pt": lambda path, vectors: torch.save({"emb_params": vectors}, path),
    "emb_params.safetensors": lambda path, vectors: save_file({"emb_params": vectors.half()}, path),
    "learned_embeds.bin": lambda path, vectors: torch.save({"<cat-toy>": vectors}, path),
}


@pytest.mark.parametrize("file_name", sorted(WRITERS))
@pytest.mark.parametrize("n_vectors", [1, 3])
def test_each_format_round_trips(tmp_path, file_name, n_vectors):
    vectors = random_vectors(n_vectors).half().float()  # exact in the fp16 file too
    path = tmp_path / file_name
    WRITERS[file_name](path, vectors)
    embedding = read_embedding(path, SD1_SIZE)
    assert embedding.name == path.stem
    assert embedding.vectors.dtype == torch.float32 and not embedding.vectors.requires_grad
    assert torch.equal(embedding.vectors, vectors)
    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and embedding.hash == embedding.sha256[:12]


def test_diffusers_single_vector_becomes_one_row(tmp_path):
    vector = random_vectors(1)[0]
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    assert torch.equal(read_embedding(tmp_path / "learned_embeds.bin").vectors, vector[None])


class WritesAMarker:
    """Unpickling this would open (create) the marker file: code from the file running."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def parameters_of(path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def write_folder(folder, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, n_vectors) in files.items():
        save_a1111_pt(folder / name, random_vectors(n_vectors, size, seed=len(name)))


def test_pickled_code_is_refused_with_one_line_and_nothing_runs(tmp_path):
    folder, marker = tmp_path / "embeddings", tmp_path / "ran"
    write_folder(folder, {"good.pt": (SD1_SIZE, 1)})
    torch.save({"string_to_param": {"*": WritesAMarker(marker)}}, folder / "evil.pt")
    with pytest.raises(EmbeddingError) as refused:
        EmbeddingDatabase(folder, vector_size=SD1_SIZE, log=pytest.fail)
    message = str(refused.value)
    assert "\n" not in message and str(folder / "evil.pt") in message and "run code" in message
    assert "--skip_bad_embeddings" in message

    lines = []
    database = EmbeddingDatabase(folder, vector_size=SD1_SIZE, log=lines.append, skip_bad=True)
    assert list(database.embeddings) == ["good"]
    assert len(lines) == 1 and "evil.pt" in lines[0] and lines[0].endswith("skipped")
    assert not marker.exists()


@pytest.mark.parametrize("write, problem", [
    (lambda path: path.write_bytes(b""), "empty"),
    (lambda path: path.write_bytes(b"PK\x03\x04 not really a zip"), "corrupt"),
    (lambda path: path.write_bytes(b"\x80\x02}q\x00."), "corrupt"),  # a bare pickle, not torch.save's
    (lambda path: torch.save({}, path), "not a textual-inversion embedding .it holds an empty dict"),
    (lambda path: torch.save([1, 2], path), "not a textual-inversion embedding .it holds a list"),
])
def test_bad_pickles_are_one_line_errors(tmp_path, write, problem):
    write(tmp_path / "bad.pt")
    with pytest.raises(EmbeddingError, match=problem) as refused:
        read_embedding(tmp_path / "bad.pt")
    assert "\n" not in str(refused.value) and str(tmp_path / "bad.pt") in str(refused.value)


def test_not_an_embedding_and_bad_safetensors_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": random_vectors(1), "#": random_vectors(1)}}, tmp_path / "two.pt")
    save_file({"weight": torch.zeros(3, 768, dtype=torch.int32)}, tmp_path / "ints.safetensors")
    save_file({"emb_params": torch.full((1, 768), float("nan"))}, tmp_path / "nan.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    for name, problem in [("two.pt", "holds 2 entries"), ("ints.safetensors", "float"),
                          ("nan.safetensors", "NaN"), ("cut.safetensors", "cut.safetensors")]:
        with pytest.raises(EmbeddingError, match=problem) as refused:
            read_embedding(tmp_path / name)
        assert "\n" not in str(refused.value)


def test_other_vector_sizes_and_sdxl_are_skipped_with_one_line_each(tmp_path):
    folder = tmp_path / "embeddings"
    write_folder(folder, {"sd1.pt": (SD1_SIZE, 2), "sd2.pt": (SD2_SIZE, 2)})
    save_file({"clip_l": random_vectors(2, 768), "clip_g": random_vectors(2, 1280)}, folder / "xl.safetensors")
    lines = []
    database = EmbeddingDatabase(folder, vector_size=SD1_SIZE, log=lines.append)
    assert list(database.embeddings) == ["sd1"] and database.skipped == lines
    assert len(lines) == 2
    assert "sd2.pt" in lines[0] and "1024" in lines[0] and "768" in lines[0] and "skipped" in lines[0]
    assert "xl.safetensors" in lines[1] and "SDXL" in lines[1]
    assert list(EmbeddingDatabase(folder, vector_size=SD2_SIZE, log=lambda line: None).embeddings) == ["sd2"]


def test_folder_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(EmbeddingDatabase(None, vector_size=SD1_SIZE, log=pytest.fail)) == 0  # no embeddings/: fine
    with pytest.raises(EmbeddingError, match="--embeddings_dir missing: no such folder"):
        EmbeddingDatabase("missing", vector_size=SD1_SIZE)
    write_folder(tmp_path / "embeddings" / "sub", {"Deep-Name.PT": (SD1_SIZE, 1)})
    (tmp_path / "embeddings" / "notes.txt").write_text("not an embedding")
    assert list(EmbeddingDatabase(None, vector_size=SD1_SIZE, log=pytest.fail).embeddings) == ["Deep-Name"]


def test_vector_sizes_of_the_text_encoders():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    with torch.device("meta"):  # the sizes only: no weights made
        assert token_vector_size(FrozenCLIPEmbedder()) == SD1_SIZE
        assert token_vector_size(FrozenOpenCLIPEmbedder(layer="penultimate")) == SD2_SIZE


def chunks_of(prompt, database):
    return prompt_chunks(prompt, SD1_PAD_TOKEN, find_embedding=database.find_embedding)


def test_multi_vector_names_take_their_vector_count_in_the_chunk(tmp_path):
    folder = tmp_path / "embeddings"
    write_folder(folder, {"bad-hands-5.pt": (SD1_SIZE, 3), "bad.pt": (SD1_SIZE, 1), "EasyNegative.pt": (SD1_SIZE, 8)})
    database = EmbeddingDatabase(folder, vector_size=SD1_SIZE)
    tokenizer = get_tokenizer()
    assert len(tokenizer.encode("bad-hands-5")) == 5 and len(tokenizer.encode("easynegative")) == 2

    (chunk,), count = chunks_of("a bad-hands-5 and bad, (EasyNegative:1.2)", database)
    ids = tokenizer.encode("a") + [0] * 3 + tokenizer.encode("and") + [0] + tokenizer.encode(",") + [0] * 8
    assert count == len(ids) and chunk.tokens[1:len(ids) + 1] == ids and chunk.tokens[len(ids) + 1] == END_TOKEN
    assert [(fix.offset, fix.embedding.name) for fix in chunk.fixes] == [(2, "bad-hands-5"), (6, "bad"), (8, "EasyNegative")]
    assert chunk.multipliers[8:16] == [1.2] * 8
    assert [embedding.name for embedding in database.used_in([[chunk]])] == ["bad-hands-5", "bad", "EasyNegative"]

    # An embedding that does not fit in what is left of a chunk starts the next one, whole.
    chunks, _count = chunks_of("word " * (CHUNK_LENGTH - 4) + "EasyNegative", database)
    assert len(chunks) == 2 and not chunks[0].fixes
    assert [(fix.offset, fix.embedding.name) for fix in chunks[1].fixes] == [(1, "EasyNegative")]


def test_ti_hashes_as_a1111_writes_them(tmp_path):
    folder = tmp_path / "embeddings"
    write_folder(folder, {"EasyNegative.pt": (SD1_SIZE, 1), "bad-hands-5.pt": (SD1_SIZE, 1)})
    database = EmbeddingDatabase(folder, vector_size=SD1_SIZE)
    cond, _ = chunks_of("EasyNegative, bad-hands-5", database)
    uncond, _ = chunks_of("bad-hands-5", database)
    short = {name: hashlib.sha256((folder / f"{name}.pt").read_bytes()).hexdigest()[:12]
             for name in ("EasyNegative", "bad-hands-5")}
    assert ti_hashes(database.used_in([cond, uncond])) == \
        f"EasyNegative: {short['EasyNegative']}, bad-hands-5: {short['bad-hands-5']}"
    assert ti_hashes([]) is None


# ----------------------------------------------------------------------------------------------
# The scripts: --embeddings_dir, the infotext, bad files
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def tiny_run(tiny_ckpt, out, *extra):
    return txt2img("--ckpt", tiny_ckpt, "--outdir", out, "--ddim_steps", 2, "--H", 64, "--W", 64, "--n_samples", 1,
                   "--n_iter", 1, "--skip_grid", "--prompt", "a shapey circle", *extra)


def test_txt2img_uses_the_folder_embeddings_and_names_them_in_the_infotext(tiny_ckpt, tmp_path):
    folder = tmp_path / "embeddings"
    tiny_size = token_vector_size(tiny_model().cond_stage_model)
    write_folder(folder, {"shapey.pt": (tiny_size, 2), "for-sd1.pt": (SD1_SIZE, 1)})
    with_embedding = tiny_run(tiny_ckpt, tmp_path / "with", "--embeddings_dir", folder)
    assert with_embedding.returncode == 0, with_embedding.stderr
    assert "for-sd1.pt has vectors of size 768" in with_embedding.stdout
    assert f"1 textual-inversion embeddings from {folder}: shapey" in with_embedding.stdout
    short_hash = hashlib.sha256((folder / "shapey.pt").read_bytes()).hexdigest()[:12]
    parameters = parameters_of(tmp_path / "with" / "samples" / "00000.png")
    assert f'TI hashes: "shapey: {short_hash}", Version' in parameters


def test_the_run_conditioning_places_the_vectors_and_records_them(tmp_path):
    loaded = loaded_tiny()
    folder = tmp_path / "embeddings"
    write_folder(folder, {"shapey.pt": (token_vector_size(loaded.model.cond_stage_model), 2)})
    loaded.embeddings = load_embeddings(folder, loaded.model.cond_stage_model, log=lambda line: None)
    with torch.no_grad():
        conditioned = {embeddings: Conditioner(loaded, print, embeddings=embeddings)(["a shapey circle"]).scheduled(2).at(0)
                       for embeddings in (None, loaded.embeddings)}
    assert list(loaded.embeddings.used) == ["shapey"]
    assert not torch.equal(*conditioned.values())
    fields = job_fields(Job(batches=[["a shapey circle"]]), loaded, 1, 0)
    assert list(fields)[-2:] == ["TI hashes", "Version"] and fields["TI hashes"].startswith("shapey: ")


def test_txt2img_refuses_pickled_code_in_one_line_exit_2_nothing_written(tiny_ckpt, tmp_path):
    folder, marker, out = tmp_path / "embeddings", tmp_path / "ran", tmp_path / "out"
    folder.mkdir()
    torch.save({"string_to_param": {"*": WritesAMarker(marker)}}, folder / "evil.pt")
    result = tiny_run(tiny_ckpt, out, "--embeddings_dir", folder)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "refusing to load embedding" in result.stderr and "evil.pt" in result.stderr
    assert not marker.exists()
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())


# ----------------------------------------------------------------------------------------------
# Numbers: diffusers' load_textual_inversion into transformers' CLIPTextModel, full size
# ----------------------------------------------------------------------------------------------


def hf_tokenizer(folder):
    """transformers' CLIPTokenizer on CLIP's vocabulary, written from our tokenizer's (no hub access)."""
    from transformers import CLIPTokenizer

    ours = get_tokenizer()
    (folder / "vocab.json").write_text(json.dumps(ours.symbol_to_id))
    merges = sorted(ours.merge_rank, key=ours.merge_rank.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def test_sd1_text_embedding_matches_diffusers_load_textual_inversion(tmp_path):
    from diffusers.loaders import TextualInversionLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    from ldm.modules.encoders.modules import VIT_L_14_TEXT_CONFIG, FrozenCLIPEmbedder

    ours = build_random(FrozenCLIPEmbedder, seed=3).eval()
    checkpoint = {"cond_stage_model." + key: value for key, value in ours.state_dict().items()}
    config = {key: VIT_L_14_TEXT_CONFIG[key] for key in
              ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "projection_dim")}
    reference = build_reference_clip(convert_ldm_clip_checkpoint(checkpoint), **config)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    # The scale of CLIP's token embeddings, so that the vectors matter as a real embedding's do.
    save_a1111_pt(folder / "mytoken.pt", 0.02 * random_vectors(4, seed=7))
    save_a1111_pt(folder / "onevec.pt", 0.02 * random_vectors(1, seed=8))

    class Pipeline(TextualInversionLoaderMixin):  # what load_textual_inversion reads of a pipeline
        hf_device_map = None
        components = {}

    pipeline, tokenizer = Pipeline(), hf_tokenizer(tmp_path)
    for name in ("mytoken", "onevec"):
        pipeline.load_textual_inversion(str(folder / f"{name}.pt"), token=name, tokenizer=tokenizer, text_encoder=reference)
    prompts = ["a photo of mytoken on a beach", "onevec, mytoken and onevec"]
    reference_ids = tokenizer(pipeline.maybe_convert_prompt(prompts, tokenizer), padding="max_length", max_length=77,
                              truncation=True, return_tensors="pt").input_ids

    database = EmbeddingDatabase(folder, vector_size=token_vector_size(ours))
    chunks = [chunks_of(prompt, database)[0] for prompt in prompts]
    assert all(len(prompt_chunks_) == 1 for prompt_chunks_ in chunks)
    tokens = torch.tensor([prompt_chunks_[0].tokens for prompt_chunks_ in chunks])
    with torch.no_grad():
        expected = reference(input_ids=reference_ids).last_hidden_state
        got = ours.encode_tokens(tokens, [prompt_chunks_[0].fixes for prompt_chunks_ in chunks])
        plain = ours.encode_tokens(tokens, None)
    assert relative_error(got, expected) < 1e-4
    assert relative_error(plain, expected) > 1e-2  # the embeddings' vectors are what makes them agree
