"""Our CLIP tokenizer against reference ids produced by the tokenizers SD 1.x and SD 2.x use."""

import json

import pytest
import torch

from conftest import reference_path
from ldm.modules.encoders.tokenizer import (
    END_TOKEN,
    SD1_PAD_TOKEN,
    SD2_PAD_TOKEN,
    START_TOKEN,
    VOCAB_SIZE,
    get_tokenizer,
    tokenize,
)

def reference_prompts():
    with open(reference_path("tokens.json"), encoding="utf-8") as f:
        return json.load(f)["prompts"]


def test_vocabulary_layout():
    tokenizer = get_tokenizer()
    assert len(tokenizer.id_to_symbol) == VOCAB_SIZE
    assert tokenizer.id_to_symbol[0] == "!"  # first printable byte
    assert tokenizer.id_to_symbol[256] == "!</w>"
    assert tokenizer.id_to_symbol[512] == "in"  # first merge rule: "i n"
    assert tokenizer.id_to_symbol[START_TOKEN] == "<|startoftext|>"
    assert tokenizer.id_to_symbol[END_TOKEN] == "<|endoftext|>"
    assert get_tokenizer() is tokenizer  # one per process


@pytest.mark.parametrize("family, pad_token", [("sd1", SD1_PAD_TOKEN), ("sd2", SD2_PAD_TOKEN)])
def test_reference_prompts_one_by_one(family, pad_token):
    for ref in reference_prompts():
        ids, lengths = tokenize([ref["prompt"]], pad_token)
        assert ids.dtype == torch.long and ids.shape == (1, 77)
        assert ids[0].tolist() == ref[f"{family}_ids"], ref["prompt"]
        assert lengths == [ref["n_tokens_untruncated_incl_start_end"]], ref["prompt"]


def test_reference_prompts_as_one_batch():
    refs = reference_prompts()
    ids, lengths = tokenize([r["prompt"] for r in refs], SD1_PAD_TOKEN)
    assert ids.tolist() == [r["sd1_ids"] for r in refs]
    assert lengths == [r["n_tokens_untruncated_incl_start_end"] for r in refs]


def test_truncation_keeps_the_end_token_last():
    ids, lengths = tokenize(["one two three four five six"], SD2_PAD_TOKEN, max_length=5)
    assert lengths == [8]
    assert ids.shape == (1, 5)
    assert ids[0, 0] == START_TOKEN and ids[0, -1] == END_TOKEN
    assert get_tokenizer().decode(ids[0].tolist()) == "one two three"


def test_cleaning():
    encode = get_tokenizer().encode
    assert encode("Fish &amp; Chips") == encode("fish & chips")
    assert encode("  a\t\tb \n c  ") == encode("a b c")
    assert encode("cafe\u0301") == encode("caf\u00e9")  # decomposed accent == composed


def test_a_single_string_is_a_batch_of_one():
    assert torch.equal(tokenize("a cat", SD1_PAD_TOKEN)[0], tokenize(["a cat"], SD1_PAD_TOKEN)[0])


def test_decode_round_trip():
    text = "a painting of a fox, in the style of ukiyo-e"
    ids, _ = tokenize([text], SD1_PAD_TOKEN)
    assert get_tokenizer().decode(ids[0].tolist()) == "a painting of a fox , in the style of ukiyo - e"
