"""A1111's prompt syntax: emphasis, BREAK, prompt editing, alternation, AND, long-prompt chunks.

Expected values are written from the rules of A1111's wiki ("Features": attention/emphasis, prompt
editing, alternating words, composable diffusion, BREAK) and its source (modules/prompt_parser.py,
modules/sd_hijack_clip.py, modules/sd_emphasis.py); doctest examples of that source are marked "A1111".
Weights are written as the products A1111 forms, in its order, because neighbours merge only when
their float weights are exactly equal.
"""

import pytest
import torch

from ldm.modules.encoders.tokenizer import END_TOKEN, SD1_PAD_TOKEN, SD2_PAD_TOKEN, START_TOKEN, get_tokenizer
from ldm.modules.prompt_encoding import (
    CHUNK_LENGTH,
    EmbeddingFix,
    apply_emphasis,
    chunk_pieces,
    encode_weighted,
    pad_chunk_lists,
    prompt_chunks,
)
from ldm.modules.prompt_syntax import PromptSyntaxError, parse_attention, prompt_schedule, split_and
from tiny_model import tiny_model

UP, DOWN = 1.1, 1 / 1.1

ATTENTION_CASES = [
    # plain text and emphasis
    ("normal text", [("normal text", 1.0)]),  # A1111
    ("", [("", 1.0)]),  # nothing parsed: one empty piece
    ("an (important) word", [("an ", 1.0), ("important", UP), (" word", 1.0)]),  # A1111
    ("a [quiet] word", [("a ", 1.0), ("quiet", DOWN), (" word", 1.0)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 1.3 )", [("word", 1.3)]),  # whitespace around the weight is allowed
    ("(word:0.5)", [("word", 0.5)]),
    ("(word:+2)", [("word", 2.0)]),
    ("(word:-1)", [("word", -1.0)]),  # negative weights are numbers like any other
    ("(word:.5)", [("word", 0.5)]),
    ("(word:2.)", [("word", 2.0)]),
    ("(word:0)", [("word", 0.0)]),
    ("((word))", [("word", 1.0 * UP * UP)]),  # nesting multiplies
    ("(((word)))", [("word", 1.0 * UP * UP * UP)]),
    ("[[word]]", [("word", 1.0 * DOWN * DOWN)]),
    ("((word:1.5))", [("word", 1.0 * 1.5 * UP)]),  # inner explicit weight, then the outer bracket
    ("([word])", [("word", 1.0 * DOWN * UP)]),
    ("[(word)]", [("word", 1.0 * UP * DOWN)]),
    ("a (b (c) d) e", [("a ", 1.0), ("b ", UP), ("c", 1.0 * UP * UP), (" d", UP), (" e", 1.0)]),
    ("(a:2) (b:2)", [("a", 2.0), (" ", 1.0), ("b", 2.0)]),  # equal weights merge only when adjacent
    ("(a:2)(b:2)", [("ab", 2.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", UP)]),  # A1111
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [  # A1111
        ("a ", 1.0), ("house", 1.0 * 1.3 * UP * UP), (" ", UP), ("on", 1.0 * DOWN * UP), (" a ", UP),
        ("hill", 1.0 * 0.5 * UP), (", sun, ", UP), ("sky", 1.0 * UP * UP * UP * UP), (".", UP),
    ]),
    # the colon: only ":number)" closing a round bracket is a weight
    ("(a:b)", [("a:b", UP)]),
    ("a:1.2", [("a:1.2", 1.0)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),  # ":1.2)" with no open round bracket is text
    ("[a:1.2]", [("a:1.2", DOWN)]),  # square brackets take no explicit weight
    ("(a:1.2]", [("a:1.2]", UP)]),  # "]" closes nothing; "(" stays open to the end
    ("time: 12:30", [("time: 12:30", 1.0)]),
    # escapes
    ("\\(literal\\]", [("(literal]", 1.0)]),  # A1111
    ("\\[x\\)", [("[x)", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),  # an escaped backslash
    ("a\\b", [("ab", 1.0)]),  # any other backslash is dropped
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
    ("(\\(a\\))", [("(a)", UP)]),
    ("smile \\(\\)", [("smile ()", 1.0)]),
    # unbalanced brackets
    ("(unbalanced", [("unbalanced", UP)]),  # A1111: an open bracket lasts to the end
    ("[unbalanced", [("unbalanced", DOWN)]),
    ("a) b", [("a) b", 1.0)]),  # a closing bracket with no opener is text
    ("a] b", [("a] b", 1.0)]),
    ("(a]", [("a]", UP)]),
    ("[a)", [("a)", DOWN)]),
    ("((a)", [("a", 1.0 * UP * UP)]),
    ("(a [b", [("a ", UP), ("b", 1.0 * UP * DOWN)]),  # open round brackets first, then square ones
    ("a (b", [("a ", 1.0), ("b", UP)]),
    (")(", [(")", 1.0)]),  # the ")" is text; the "(" opens and closes nothing
    ("()", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("(a:1.5", [("a:1.5", UP)]),  # no ")" after the number: not a weight
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),  # the spaces around BREAK go with it
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # only in capitals
    ("aBREAKb", [("aBREAKb", 1.0)]),  # only as a whole word
    ("BREAKING news", [("BREAKING news", 1.0)]),
    ("a BREAK b BREAK c", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0), ("BREAK", -1.0), ("c", 1.0)]),
    ("(a) BREAK (b)", [("a", UP), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", UP)]),
    # BREAK inside brackets has its weight multiplied, and is then no longer a chunk break (as A1111)
    ("(a BREAK b)", [("a", UP), ("BREAK", -1.0 * UP), ("b", UP)]),
    # other syntax is text here: prompt editing is resolved before, LoRA tags elsewhere
    ("a [b:c:5] d", [("a ", 1.0), ("b:c:5", DOWN), (" d", 1.0)]),
    ("<lora:x:0.8>", [("<lora:x:0.8>", 1.0)]),
    ("a | b", [("a | b", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", ATTENTION_CASES)
def test_attention_parsing(prompt, expected):
    assert parse_attention(prompt) == expected


def test_attention_table_is_large_enough():
    assert len(ATTENTION_CASES) + len(SCHEDULE_CASES) + len(AND_CASES) >= 60


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a:..5)"])
def test_a_weight_that_is_not_a_number_is_named(prompt):
    with pytest.raises(PromptSyntaxError, match="not a number"):
        parse_attention(prompt)


def alternating(first, second, steps=10):
    return [(step, first if step % 2 else second) for step in range(1, steps + 1)]


SCHEDULE_CASES = [
    # (prompt, steps, expected); "A1111" marks examples from get_learned_conditioning_prompt_schedules
    ("test", 10, [(10, "test")]),  # A1111
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),  # A1111: [to:when] adds "to" after step 3
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),  # A1111
    ("a [b:3 ]", 10, [(3, "a "), (10, "a b")]),
    ("a [b::3]", 10, [(3, "a b"), (10, "a ")]),  # [from::when] removes "from" after step 3
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),  # A1111: emphasis stays for parse_attention
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),  # A1111
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),  # A1111: the spaces stay
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),  # A1111: nested
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),  # A1111
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),  # A1111: ".5" is a fraction of the steps
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),  # A1111: stray brackets
    ("[a|(b:1.1)]", 10, alternating("a", "(b:1.1)")),  # A1111
    ("[fe|]male", 10, alternating("female", "male")),  # A1111: an empty option
    ("[fe|||]male", 10, [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),  # A1111
    ("[cat|dog|fox]", 6, [(1, "cat"), (2, "dog"), (3, "fox"), (4, "cat"), (5, "dog"), (6, "fox")]),
    ("[mountain:lake:0.25]", 20, [(5, "mountain"), (20, "lake")]),
    ("[mountain:lake:0.25]", 10, [(2, "mountain"), (10, "lake")]),  # 2.5 steps: int() truncates
    ("[a:b:1.0]", 10, [(10, "a")]),  # with a ".", 1.0 is the whole run: never switches
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),  # without one, 1 is step 1
    ("[a:b:1.5]", 10, [(10, "a")]),  # past the end: clamped to the last step
    ("[a:b:25]", 10, [(10, "a")]),
    ("[a:b:0]", 10, [(10, "b")]),  # step 0: "to" from the first step
    ("[a:b:-2]", 10, [(10, "b")]),
    ("[a:b:1e1]", 10, [(10, "a")]),  # a number as lark reads it (exponent, no "."): step 10
    ("[a:b:1e999]", 10, [(10, "a")]),  # infinitely late: never switches (A1111 crashes on it)
    ("[a:b:c]", 10, [(10, "[a:b:c]")]),  # no number: plain text
    ("[a:b:c:3]", 10, [(10, "[a:b:c:3]")]),  # a bare ":" inside: not a schedule
    ("[a:[b:3]]", 10, [(3, "[a:]"), (10, "[a:b]")]),  # only the inner one is complete
    ("[[a:b:3]:c:5]", 10, [(3, "a"), (5, "b"), (10, "c")]),
    ("(a:[b:c:2])", 10, [(2, "(a:b)"), (10, "(a:c)")]),  # editing inside a weight's brackets
    ("[a:(b:2):0.5]", 10, [(5, "a"), (10, "(b:2)")]),
    ("[a|[b:c:2]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")]),
    ("[[a|b]:3]", 4, [(1, ""), (2, ""), (3, ""), (4, "b")]),
    ("a | b [c:3]", 10, [(10, "a | b [c:3]")]),  # "|" outside [...] fails the whole parse: verbatim
    ("[a|b", 10, [(10, "[a|b")]),
    ("a\\", 10, [(10, "a\\")]),  # a backslash escaping nothing fails the parse
    ("\\[a:3\\]", 10, [(10, "\\[a:3\\]")]),  # escaped brackets are text
    ("[:3]", 10, [(3, ""), (10, "")]),
    ("x BREAK [y:2]", 10, [(2, "x BREAK "), (10, "x BREAK y")]),
]


@pytest.mark.parametrize("prompt,steps,expected", SCHEDULE_CASES)
def test_prompt_schedule(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_schedule_in_a_hires_pass_counts_on_from_the_first_pass():
    # A1111 doctest, hires pass of 10 steps after 10: ".5" was the first pass's half, "1.5" half of this one
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:15] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_old_scheduling_reads_numbers_below_one_as_fractions():
    assert prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]


AND_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),  # trailing space dropped, leading kept
    ("a cat AND a dog :0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("a cat :1.2 AND a dog:-0.5", [("a cat", 1.2), (" a dog", -0.5)]),
    ("a cat:2", [("a cat", 2.0)]),  # as A1111: a trailing weight is read even without AND
    ("a cat and a dog", [("a cat and a dog", 1.0)]),  # only in capitals
    ("SANDY AND", [("SANDY", 1.0), ("", 1.0)]),  # only as a whole word
    ("(a:1.2) AND b", [("(a:1.2)", 1.0), (" b", 1.0)]),  # an emphasis weight is not an AND weight
    ("a AND b AND c :3.", [("a", 1.0), (" b", 1.0), (" c", 3.0)]),
]


@pytest.mark.parametrize("prompt,expected", AND_CASES)
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# ----------------------------------------------------------------------------------------------
# Chunks of 75 tokens
# ----------------------------------------------------------------------------------------------

A, COMMA = get_tokenizer().encode("a, a")[:2]


def bodies(chunks):
    """Each chunk's prompt tokens, without start, end and padding."""
    result = []
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.multipliers) == CHUNK_LENGTH + 2
        assert chunk.tokens[0] == START_TOKEN
        result.append(chunk.tokens[1 : chunk.tokens.index(END_TOKEN)])
    return result


def words(n):
    return " ".join(["a"] * n)


def test_a_short_prompt_is_one_chunk_framed_as_the_encoder_frames_it():
    for pad in (SD1_PAD_TOKEN, SD2_PAD_TOKEN):
        chunks, count = prompt_chunks("a red circle", pad)
        tokens, _ = get_tokenizer().tokenize(["a red circle"], pad)
        assert [chunk.tokens for chunk in chunks] == tokens.tolist()
        assert chunks[0].multipliers == [1.0] * 77 and count == 3


def test_75_tokens_fit_one_chunk_and_76_need_two():
    assert [len(b) for b in bodies(prompt_chunks(words(75), SD1_PAD_TOKEN)[0])] == [75]
    chunks, count = prompt_chunks(words(76), SD1_PAD_TOKEN)
    assert [len(b) for b in bodies(chunks)] == [75, 1] and count == 76
    assert [len(b) for b in bodies(prompt_chunks(words(200), SD1_PAD_TOKEN)[0])] == [75, 75, 50]


@pytest.mark.parametrize(
    "comma_at,expected_lengths",
    [
        (70, [71, 10]),  # the chunk would end 5 tokens after the comma: it ends at the comma
        (55, [56, 25]),  # 20 tokens after it: still within the backtrack distance
        (54, [75, 6]),  # 21 tokens: too far, the chunk is cut at 75
        (74, [75, 6]),  # the comma is the chunk's last token: nothing to move
        (75, [75, 6]),  # a comma arriving at a full chunk starts the next one itself
    ],
)
def test_comma_backtracking(comma_at, expected_lengths):
    # comma_at words, a comma, then words up to 80 tokens in all
    prompt = words(comma_at) + ", " + words(80 - comma_at)
    chunks, _ = prompt_chunks(prompt, SD1_PAD_TOKEN)
    lengths = [len(b) for b in bodies(chunks)]
    assert lengths == expected_lengths
    assert sum(bodies(chunks), []) == [A] * comma_at + [COMMA] + [A] * (80 - comma_at)


def test_comma_backtracking_off():
    chunks, _ = chunk_pieces([(words(70) + ", " + words(10), 1.0)], SD1_PAD_TOKEN, comma_backtrack=0)
    assert [len(b) for b in bodies(chunks)] == [75, 6]


def test_moved_tokens_keep_their_weights():
    chunks, _ = prompt_chunks(words(70) + ", (" + words(10) + ":1.5)", SD1_PAD_TOKEN)
    assert chunks[1].multipliers[1:11] == [1.5] * 10 and chunks[1].multipliers[11] == 1.0
    assert chunks[0].multipliers == [1.0] * 77


def test_break_starts_a_new_chunk():
    chunks, count = prompt_chunks("a red circle BREAK a blue square", SD1_PAD_TOKEN)
    tokenizer = get_tokenizer()
    assert bodies(chunks) == [tokenizer.encode("a red circle"), tokenizer.encode("a blue square")]
    assert count == 75 + 3
    assert [len(b) for b in bodies(prompt_chunks("BREAK a", SD1_PAD_TOKEN)[0])] == [0, 1]  # as A1111
    assert [len(b) for b in bodies(prompt_chunks("a BREAK", SD1_PAD_TOKEN)[0])] == [1]
    # with emphasis "none" nothing is parsed: BREAK is a word
    assert [len(b) for b in bodies(prompt_chunks("a BREAK b", SD1_PAD_TOKEN, emphasis="none")[0])] == [3]


def test_weights_follow_their_tokens():
    chunks, _ = prompt_chunks("a (red:1.5) [circle]", SD1_PAD_TOKEN)
    red, circle = get_tokenizer().encode("red circle")
    assert chunks[0].tokens[1:5] == [A, red, circle, END_TOKEN]
    assert chunks[0].multipliers[:5] == [1.0, 1.0, 1.5, DOWN, 1.0]


def test_embeddings_take_their_vectors_places_and_move_with_backtracking():
    marker = get_tokenizer().encode("emb")

    def find_embedding(ids, position):
        return ("EMB", 3, len(marker)) if ids[position : position + len(marker)] == marker else None

    # 70 words, a comma, the embedding's 3 vectors and a word fill the chunk: the next word moves all
    # that follows the comma, the embedding's vectors with it
    chunks, _ = chunk_pieces([(words(70) + ", emb " + words(3), 1.0)], SD1_PAD_TOKEN, find_embedding=find_embedding)
    assert [len(b) for b in bodies(chunks)] == [71, 6]
    assert chunks[0].fixes == [] and [(f.offset, f.embedding) for f in chunks[1].fixes] == [(1, "EMB")]
    assert chunks[1].tokens[1:7] == [0, 0, 0, A, A, A]
    # an embedding that does not fit starts the next chunk (no comma backtracking for it, as A1111)
    chunks, _ = chunk_pieces([(words(70) + ", a a emb a", 1.0)], SD1_PAD_TOKEN, find_embedding=find_embedding)
    assert [len(b) for b in bodies(chunks)] == [73, 4]


def test_cond_and_uncond_are_padded_with_empty_chunks():
    long_chunks, _ = prompt_chunks(words(100), SD2_PAD_TOKEN)
    short_chunks, _ = prompt_chunks("", SD2_PAD_TOKEN)
    padded_long, padded_short = pad_chunk_lists([long_chunks, short_chunks], SD2_PAD_TOKEN)
    assert padded_long == long_chunks and len(padded_short) == 2
    empty_tokens = get_tokenizer().tokenize([""], SD2_PAD_TOKEN)[0][0].tolist()
    assert padded_short[1].tokens == empty_tokens == [START_TOKEN, END_TOKEN] + [0] * 75


# ----------------------------------------------------------------------------------------------
# Encoding with weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def encode(model, prompts, emphasis="original"):
    encoder = model.cond_stage_model
    chunk_lists = [prompt_chunks(prompt, encoder.pad_token, emphasis)[0] for prompt in prompts]
    with torch.no_grad():
        return encode_weighted(encoder.encode_tokens, pad_chunk_lists(chunk_lists, encoder.pad_token), emphasis)


def test_a_plain_prompt_gives_exactly_todays_conditioning(model):
    prompts = ["a red circle on a blue square", "", words(75)]
    with torch.no_grad():
        today = model.get_learned_conditioning(prompts)
    assert torch.equal(encode(model, prompts), today)
    assert "tokenize" not in vars(model.cond_stage_model)  # the encoder's own tokenization is back


def test_a_long_prompt_is_encoded_chunk_by_chunk(model):
    first, second = words(75), "a red circle"
    with torch.no_grad():
        expected = torch.cat([model.get_learned_conditioning([first]), model.get_learned_conditioning([second])], 1)
    assert torch.equal(encode(model, [first + " " + second]), expected)


def test_weights_scale_the_tokens_outputs(model):
    plain = encode(model, ["a red circle"])
    no_norm = encode(model, ["a (red:1.5) circle"], emphasis="no norm")
    assert torch.allclose(no_norm[0, 2], plain[0, 2] * 1.5) and not torch.allclose(no_norm[0, 2], plain[0, 2])
    untouched = [i for i in range(77) if i != 2]
    assert torch.equal(no_norm[0, untouched], plain[0, untouched])


def test_original_emphasis_restores_the_mean(model):
    unshifted = encode(model, ["a red circle"])
    plain = unshifted + 0.5  # an output with a mean well away from zero, as CLIP's
    multipliers = torch.tensor([[1.0, 1.0, 1.5, DOWN] + [1.0] * 73])
    original = apply_emphasis(plain, multipliers, "original")
    assert torch.allclose(original.mean(), plain.mean(), rtol=1e-5, atol=1e-7)
    rescale = plain.mean() / (plain * multipliers[0][:, None]).mean()
    assert torch.allclose(original[0, 2], plain[0, 2] * 1.5 * rescale, rtol=1e-5)
    assert torch.allclose(original[0, 5], plain[0, 5] * rescale, rtol=1e-5)  # every token rescaled
    assert torch.equal(encode(model, ["a (red:1.5) [circle]"], emphasis="ignore"), unshifted)


def test_original_emphasis_leaves_a_mean_of_about_zero_alone(model):
    """The tiny encoder's bias-free final norm averages to ~1e-8: dividing by it would scale the chunk at random."""
    plain = encode(model, ["a red circle"])
    assert plain.mean().abs() < 1e-6 * plain.abs().mean()
    weighted = encode(model, ["a (red:1.5) circle"])
    assert torch.equal(weighted, encode(model, ["a (red:1.5) circle"], emphasis="no norm"))
    assert torch.isfinite(weighted).all() and weighted.abs().max() < 10 * plain.abs().max()


def test_the_mean_is_restored_over_the_whole_batch_as_a1111_does():
    z = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    multipliers = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    out = apply_emphasis(z, multipliers, "original")
    assert torch.allclose(out, torch.tensor([[[2.0], [2.0]], [[3.0], [4.0]]]) * (2.5 / 2.75))
    assert torch.allclose(out.mean(), z.mean())


def test_the_encoder_adapter_places_embedding_vectors(model):
    encoder = model.cond_stage_model
    encode_chunk = encoder.encode_tokens
    tokens = torch.tensor([prompt_chunks("a red", SD1_PAD_TOKEN)[0][0].tokens])
    swapped = torch.tensor([prompt_chunks("a blue", SD1_PAD_TOKEN)[0][0].tokens])

    class Embedding:  # one vector: that of "blue", placed where "red" is (offset 2: after start and "a")
        vectors = encoder.token_embedding.weight[swapped[0, 2:3]]

    with torch.no_grad():
        assert torch.equal(encode_chunk(tokens, [[EmbeddingFix(2, Embedding)]]), encode_chunk(swapped, [[]]))


def test_unknown_emphasis_is_named():
    with pytest.raises(ValueError, match="unknown emphasis 'strong'"):
        prompt_chunks("a", SD1_PAD_TOKEN, emphasis="strong")
