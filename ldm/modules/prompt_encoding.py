"""Prompts of any length, with A1111's weights, through a 77-token text encoder.

``prompt_chunks`` cuts a prompt into chunks of 75 token ids (framed by the start and end tokens:
77, what CLIP reads at once) with a weight per token, as AUTOMATIC1111's ``tokenize_line``: ``BREAK``
starts a new chunk, and a chunk that would end less than ``COMMA_BACKTRACK`` tokens after a comma
ends at that comma instead, so that a phrase is not split across two chunks. ``encode_weighted``
encodes each chunk, scales each token's output by its weight, restores the chunk's original mean
("Original" emphasis) and concatenates the chunks along the token axis.

A prompt of at most 75 tokens with no syntax is one chunk with weights all 1: the same token ids as
the encoder's own tokenization, and so exactly the same conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ldm.modules.encoders.tokenizer import END_TOKEN, START_TOKEN, get_tokenizer
from ldm.modules.prompt_syntax import BREAK_PIECE, parse_attention

CHUNK_LENGTH = 75  # prompt tokens per chunk; + start and end = CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MEAN_NEAR_ZERO = 1e-3  # |mean| / mean |value| below which "original" emphasis keeps its hands off the mean

# A1111's emphasis modes: "original" weights then restores the mean, "no norm" only weights,
# "ignore" parses the brackets but weights nothing, "none" reads brackets as plain text.
EMPHASIS_MODES = ("original", "no norm", "ignore", "none")


@dataclass
class EmbeddingFix:
    """A textual-inversion embedding whose vectors replace the token embeddings at ``offset``
    (an index into the chunk's 77 tokens) and the ``vectors - 1`` positions after it."""

    offset: int
    embedding: object


@dataclass
class PromptChunk:
    tokens: list[int]  # 77 ids: start, up to 75 prompt tokens, end, padding
    multipliers: list[float]  # one weight per token (1.0 for start, end and padding)
    fixes: list[EmbeddingFix] = field(default_factory=list)


# ``find_embedding(token_ids, position) -> (embedding, n_vectors, n_tokens) | None``: the embedding whose
# name's tokens start at ``position`` (it takes ``n_vectors`` places in the chunk for ``n_tokens`` ids).
FindEmbedding = Callable[[list, int], "tuple[object, int, int] | None"]


def frame_chunk(
    body: list[int], multipliers: list[float], pad_token: int, fixes=(), chunk_length: int = CHUNK_LENGTH
) -> PromptChunk:
    """A chunk of at most ``chunk_length`` prompt tokens, framed and padded as the encoder's own
    tokenization does: start, the tokens, end, then ``pad_token`` (SD 1.x pads with the end token,
    SD 2.x with 0). ``chunk_length`` is less than 75 only for an encoder that reads fewer than 77 tokens."""
    if len(body) > chunk_length:
        raise ValueError(f"a chunk holds at most {chunk_length} tokens, got {len(body)}")
    n_pad = chunk_length - len(body)
    tokens = [START_TOKEN] + body + [END_TOKEN] * (n_pad + 1)
    # As A1111: everything after the first end token is padding (an end token typed in the prompt counts).
    first_end = tokens.index(END_TOKEN)
    tokens[first_end + 1 :] = [pad_token] * (len(tokens) - first_end - 1)
    weights = [1.0] + list(multipliers) + [1.0] * (n_pad + 1)
    return PromptChunk(tokens, weights, [EmbeddingFix(fix.offset + 1, fix.embedding) for fix in fixes])


def empty_chunk(pad_token: int, chunk_length: int = CHUNK_LENGTH) -> PromptChunk:
    """The chunk of the empty prompt: what pads the shorter of two chunk lists."""
    return frame_chunk([], [], pad_token, chunk_length=chunk_length)


class _ChunkBuilder:
    """A1111's tokenize_line loop: fills chunks token by token, backtracking to the last comma."""

    def __init__(self, pad_token: int, comma_token: int, comma_backtrack: int, chunk_length: int):
        self.pad_token = pad_token
        self.chunk_length = chunk_length
        self.comma_token = comma_token
        self.comma_backtrack = comma_backtrack
        self.chunks: list[PromptChunk] = []
        self.token_count = 0
        self.start_chunk([], [], [])

    def start_chunk(self, tokens, weights, fixes) -> None:
        self.tokens, self.weights, self.fixes = tokens, weights, fixes
        self.last_comma = -1  # index in self.tokens of the last comma, -1 for none

    def close_chunk(self, is_last: bool = False) -> None:
        self.token_count += len(self.tokens) if is_last else self.chunk_length
        self.chunks.append(frame_chunk(self.tokens, self.weights, self.pad_token, self.fixes, self.chunk_length))
        self.start_chunk([], [], [])

    def move_after_last_comma(self) -> None:
        """Close the full chunk at its last comma; what follows the comma opens the next chunk."""
        cut = self.last_comma + 1
        moved_tokens, moved_weights = self.tokens[cut:], self.weights[cut:]
        # Embeddings after the comma move with their placeholder tokens (A1111 leaves them behind, so
        # that their vectors land on the old chunk's padding).
        moved_fixes = [EmbeddingFix(fix.offset - cut, fix.embedding) for fix in self.fixes if fix.offset >= cut]
        self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
        self.fixes = [fix for fix in self.fixes if fix.offset < cut]
        self.close_chunk()
        self.start_chunk(moved_tokens, moved_weights, moved_fixes)

    def add_piece(self, ids: list[int], weight: float, find_embedding: FindEmbedding | None) -> None:
        position = 0
        while position < len(ids):
            full = len(self.tokens) == self.chunk_length
            if ids[position] == self.comma_token:  # a comma itself is never moved to the next chunk
                self.last_comma = len(self.tokens)
            elif full and self.last_comma != -1 and len(self.tokens) - self.last_comma <= self.comma_backtrack:
                self.move_after_last_comma()
            if len(self.tokens) == self.chunk_length:
                self.close_chunk()
            found = find_embedding(ids, position) if find_embedding else None
            if found is None:
                self.tokens.append(ids[position])
                self.weights.append(weight)
                position += 1
                continue
            embedding, n_vectors, n_tokens = found
            if len(self.tokens) + n_vectors > self.chunk_length:
                self.close_chunk()
            self.fixes.append(EmbeddingFix(len(self.tokens), embedding))
            self.tokens += [0] * n_vectors  # placeholders: the embedding's vectors go there
            self.weights += [weight] * n_vectors
            position += n_tokens


def chunk_pieces(
    pieces: list[tuple[str, float]],
    pad_token: int,
    encode_text: Callable[[str], list[int]] | None = None,
    comma_token: int | None = None,
    find_embedding: FindEmbedding | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
    chunk_length: int = CHUNK_LENGTH,
) -> tuple[list[PromptChunk], int]:
    """Chunks of weighted prompt pieces (``parse_attention``'s output) and the prompt's token count
    (A1111's count: 75 per full chunk plus the last chunk's tokens).

    Each piece is tokenized on its own (``encode_text``, CLIP's tokenizer by default), as A1111 does.
    A ``("BREAK", -1.0)`` piece closes the current chunk, even an empty one. ``comma_backtrack`` 0
    turns the comma rule off.
    """
    tokenizer = get_tokenizer()
    encode_text = encode_text or tokenizer.encode
    if comma_token is None:
        comma_token = tokenizer.symbol_to_id[",</w>"]
    builder = _ChunkBuilder(pad_token, comma_token, comma_backtrack, chunk_length)
    for text, weight in pieces:
        if (text, weight) == BREAK_PIECE:
            builder.close_chunk()
            continue
        builder.add_piece(encode_text(text), weight, find_embedding)
    if builder.tokens or not builder.chunks:
        builder.close_chunk(is_last=True)
    return builder.chunks, builder.token_count


def prompt_chunks(
    prompt: str, pad_token: int, emphasis: str = "original", **chunk_options
) -> tuple[list[PromptChunk], int]:
    """``chunk_pieces`` of a prompt's text (one step's text: prompt editing is resolved before)."""
    check_emphasis(emphasis)
    pieces = [(prompt, 1.0)] if emphasis == "none" else parse_attention(prompt)
    return chunk_pieces(pieces, pad_token, **chunk_options)


def pad_chunk_lists(
    chunk_lists: list[list[PromptChunk]], pad_token: int, chunk_length: int = CHUNK_LENGTH
) -> list[list[PromptChunk]]:
    """The lists extended with empty chunks to the longest one's length.

    For cond and uncond, pad their chunk lists together but encode them in separate ``encode_weighted``
    calls, as A1111 encodes them: a padding chunk then equals the empty prompt's encoding, and each
    prompt's "original" emphasis keeps its own mean.
    """
    count = max(len(chunks) for chunks in chunk_lists)
    return [chunks + [empty_chunk(pad_token, chunk_length) for _ in range(count - len(chunks))] for chunks in chunk_lists]


def check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"unknown emphasis {emphasis!r}; choose one of {', '.join(EMPHASIS_MODES)}")


# ``encode_chunk(tokens [B, 77], fixes: per row, the chunk's EmbeddingFix list) -> [B, 77, width]``
EncodeChunk = Callable[[torch.LongTensor, list], torch.Tensor]


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """One chunk's encoder output [B, 77, width] weighted per token ([B, 77]).

    "original": after weighting, the output is scaled back to the mean it had before, over the whole
    batch as A1111 computes it (unless either mean is about zero, see _mean_near_zero). All-ones weights leave ``z`` untouched (A1111's arithmetic would give
    the same values: z * 1 * (m / m)). The weighting is done in float32 and cast back to z's dtype.
    """
    check_emphasis(emphasis)
    if emphasis in ("ignore", "none") or bool((multipliers == 1).all()):
        return z
    z32 = z.float()
    weighted = z32 * multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    if emphasis == "original" and not _mean_near_zero(z32) and not _mean_near_zero(weighted):
        weighted = weighted * (z32.mean() / weighted.mean())
    return weighted.to(z.dtype)


def _mean_near_zero(z: torch.Tensor) -> bool:
    """Where an encoder's output averages to about nothing (a bias-free final layer norm, as in small random
    models), "restoring the mean" divides by about zero and scales the whole chunk by an arbitrary factor:
    then the weights apply without it. CLIP's outputs are far from that, so A1111's arithmetic stands."""
    return bool(z.mean().abs() <= MEAN_NEAR_ZERO * z.abs().mean())


def encode_weighted(
    encode_chunk: EncodeChunk, batch_chunks: list[list[PromptChunk]], emphasis: str = "original"
) -> torch.Tensor:
    """Conditioning [B, 77 * n_chunks, width] of a batch of chunked prompts (one chunk list per prompt,
    all of the same length: see ``pad_chunk_lists``). Chunk i of every prompt is encoded as one batch.

    The batch matters for "original" emphasis, whose mean is taken over it: A1111 encodes the texts
    of one prompt's editing schedule (``prompt_schedule``) as one batch, and each prompt on its own.
    """
    check_emphasis(emphasis)
    counts = {len(chunks) for chunks in batch_chunks}
    if len(counts) != 1:
        raise ValueError(f"every prompt needs the same number of chunks (pad_chunk_lists), got {sorted(counts)}")
    outputs = []
    for index in range(counts.pop()):
        column = [chunks[index] for chunks in batch_chunks]
        tokens = torch.tensor([chunk.tokens for chunk in column], dtype=torch.long)
        z = encode_chunk(tokens, [chunk.fixes for chunk in column])
        multipliers = torch.tensor([chunk.multipliers for chunk in column], dtype=torch.float32)
        outputs.append(apply_emphasis(z, multipliers, emphasis))
    return torch.cat(outputs, dim=1)
