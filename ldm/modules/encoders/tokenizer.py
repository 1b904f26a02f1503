"""CLIP's byte-level BPE tokenizer, written for this project.

Both Stable Diffusion generations tokenize prompts with the same CLIP vocabulary; they differ only in
the id used to pad to 77 tokens (SD 1.x: the end token 49407, SD 2.x: 0, which is "!"). The
vocabulary ships with the package as ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's, MIT licence; see
``LICENSE-open_clip``): a header line, then one merge rule per line, best first.

Token ids, in order:
    0 .. 255        the 256 byte symbols (in GPT-2's ``bytes_to_unicode`` order)
    256 .. 511      the same symbols ending a word (suffix ``</w>``)
    512 .. 49405    one symbol per merge rule (lines 1 .. 48894 of the file)
    49406, 49407    ``<|startoftext|>``, ``<|endoftext|>``
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import unicodedata

import regex  # a dependency of transformers; needed for the \p{L} / \p{N} classes of CLIP's pattern
import torch

START_TOKEN = 49406
END_TOKEN = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# Prompts are padded with these ids by the two model families.
SD1_PAD_TOKEN = END_TOKEN
SD2_PAD_TOKEN = 0

BPE_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merge lines follow the header

WORD_END = "</w>"
SPECIAL_TOKENS = {"<|startoftext|>": START_TOKEN, "<|endoftext|>": END_TOKEN}

# CLIP's pre-tokenizer: special tokens, English contractions, runs of letters, single digits, and runs
# of everything else that is not whitespace. The text is lowercased before, so IGNORECASE only matters
# for characters whose lowercase is still not lowercase; kept for fidelity with CLIP.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE_RUN = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so that BPE can work on strings.

    Printable latin-1 bytes map to themselves; the others (control characters, space, ...) are shifted
    to code points 256 and up, in byte order. The dictionary's order is the vocabulary's order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_to_char = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(next_free)
            next_free += 1
    return {b: byte_to_char[b] for b in printable + [b for b in range(256) if b not in printable]}


def clean_text(text: str) -> str:
    """Normalise a prompt the way CLIP's tokenizer does before splitting it into words.

    CLIP runs ``ftfy.fix_text`` (not available here); for well-formed text its effect that matters is
    the NFC normalisation (composed accents), which we do. Then HTML entities are unescaped (twice,
    as CLIP does, for doubly escaped text), whitespace runs collapse to one space, and the text is
    lowercased.
    """
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    text = WHITESPACE_RUN.sub(" ", text).strip()
    return text.lower()


class CLIPTokenizer:
    """Prompt text -> CLIP token ids. Use the process-wide instance from ``get_tokenizer()``."""

    def __init__(self, bpe_vocab_path: str = BPE_VOCAB_PATH):
        with gzip.open(bpe_vocab_path, "rt", encoding="utf-8") as f:
            merge_lines = f.read().split("\n")[1 : N_MERGES + 1]  # line 0 is the version header
        merges = [tuple(line.split()) for line in merge_lines]

        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        symbols = list(self.byte_to_char.values())
        symbols += [s + WORD_END for s in symbols]
        symbols += ["".join(pair) for pair in merges]
        symbols += list(SPECIAL_TOKENS)
        assert len(symbols) == VOCAB_SIZE, f"unexpected vocabulary size {len(symbols)}"

        self.symbol_to_id = {s: i for i, s in enumerate(symbols)}
        self.id_to_symbol = symbols
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        # Prompts repeat words a lot (and a UI re-encodes the same prompt on every run): cache per word.
        self.word_to_ids = functools.lru_cache(maxsize=1 << 16)(self._word_to_ids)

    def _merge_word(self, word: str) -> list[str]:
        """Apply the merge rules to one word (already mapped to byte symbols), best-ranked first."""
        parts = list(word[:-1]) + [word[-1] + WORD_END]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, N_MERGES))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_to_ids(self, word: str) -> tuple[int, ...]:
        if word in SPECIAL_TOKENS:
            return (SPECIAL_TOKENS[word],)
        as_symbols = "".join(self.byte_to_char[b] for b in word.encode("utf-8"))
        return tuple(self.symbol_to_id[s] for s in self._merge_word(as_symbols))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without the start and end tokens."""
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self.word_to_ids(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (lowercased, cleaned): e.g. to show the part of a prompt that was cut off."""
        ids = [i for i in ids if i not in (START_TOKEN, END_TOKEN)]
        symbols = "".join(self.id_to_symbol[i] for i in ids).replace(WORD_END, self.byte_to_char[ord(" ")])
        text = bytearray(self.char_to_byte[c] for c in symbols)
        return text.decode("utf-8", errors="replace").strip()

    def tokenize(
        self, texts: list[str], pad_token: int, max_length: int = CONTEXT_LENGTH
    ) -> tuple[torch.LongTensor, list[int]]:
        """Token ids [len(texts), max_length] framed by start/end tokens, and the untruncated lengths.

        A prompt too long is cut so that the end token is still the last one, as both CLIP tokenizers
        used by Stable Diffusion do; the lengths (start and end tokens included) let callers warn
        about what was cut.
        """
        if isinstance(texts, str):
            texts = [texts]
        batch = torch.full((len(texts), max_length), pad_token, dtype=torch.long)
        lengths = []
        for row, text in enumerate(texts):
            ids = [START_TOKEN] + self.encode(text) + [END_TOKEN]
            lengths.append(len(ids))
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [END_TOKEN]
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch, lengths


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> CLIPTokenizer:
    """The tokenizer of this process, built on first use (reading the vocabulary takes ~0.3 s)."""
    return CLIPTokenizer()


def tokenize(
    texts: list[str], pad_token: int, max_length: int = CONTEXT_LENGTH
) -> tuple[torch.LongTensor, list[int]]:
    """See ``CLIPTokenizer.tokenize``; uses the process-wide tokenizer."""
    return get_tokenizer().tokenize(texts, pad_token, max_length)
