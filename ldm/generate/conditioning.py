"""Text conditioning from prompts written as AUTOMATIC1111 users write them.

Every prompt and negative prompt goes through A1111's syntax: attention weights, ``BREAK``, prompts of
any length in chunks of 75 tokens (ldm.modules.prompt_encoding), prompt editing and alternation (the
text changes during sampling, ldm.modules.prompt_syntax.prompt_schedule) and, in prompts, composable
``AND`` parts with weights (the guided predictions combined as A1111's combine_denoised).

`Conditioner(prompts)` gives a `PromptConditioning`, which encodes nothing yet: the texts of an edited
prompt depend on the number of steps of the pass that uses it. `resolve(cond, steps)` encodes them (each
distinct group of texts once per run) into `StepConditioning`s, the objects GuidedDenoiser asks for the
conditioning of each model call. As in A1111 (its CFGDenoiser.step), the schedule's steps are model calls
counted from 0, and a second-order sampler's schedule is made for twice its steps (`schedule_steps`).

A batch of plain prompts (no edit, no AND, no weight) is encoded as one batch through the encoder's own
forward pass, as the original scripts encode it, so that their conditioning stays the same to the bit.

SDXL (a conditioner with several text encoders) goes through the same syntax: each encoder chunks and
weights the prompt with its own padding and its own "original" mean, and their outputs are concatenated
along the width per chunk, as A1111 does; the pooled output of the first chunk, with the size (and
aesthetic-score) embeddings, makes the vector condition ``y``, which follows the prompt's edits step by step
(`StepVectors`). A negative prompt that is empty for the whole batch gets zero text embeddings (A1111's
force_zero_embeddings); the empty chunks that pad a shorter conditioning stay the empty prompt's encoding.
"""
from __future__ import annotations

import torch

from ldm.generate.errors import UserError
from ldm.modules.prompt_encoding import (
    CHUNK_LENGTH, EMPHASIS_MODES, encode_weighted, pad_chunk_lists, prompt_chunks,
)
from ldm.modules.prompt_syntax import PromptSyntaxError, prompt_schedule, split_and
from ldm.modules.encoders.sdxl_conditioner import SDXLConditioner, SizeConditioning

# A1111's names of the emphasis modes, as its infotext writes them.
EMPHASIS_NAMES = {"original": "Original", "no norm": "No norm", "ignore": "Ignore", "none": "None"}
assert set(EMPHASIS_NAMES) == set(EMPHASIS_MODES)


class StepConditioning:
    """One batch's text conditioning for each model call of a pass.

    rows: per row, ``(ends, tensor [k, L, D])``: the row's text i is used for model calls up to and
    including ``ends[i]`` (the first call is 0), as A1111's reconstruct_cond_batch. parts: per image of
    the batch, ``[(row, weight), ...]``, its AND parts. empty: the empty prompt's encoding [1, l, D], what
    pads a shorter conditioning (A1111's pad_cond).
    """

    def __init__(self, rows: list, parts: list[list[tuple[int, float]]], empty: torch.Tensor):
        self.rows, self.parts, self.empty = rows, parts, empty
        self._last = None

    @property
    def simple(self) -> bool:
        """Each image has one part of weight 1, in row order: plain classifier-free guidance."""
        return all(part == [(index, 1.0)] for index, part in enumerate(self.parts))

    def _chosen(self, step: int) -> tuple[int, ...]:
        # Past the last end (a sampler calling the model more often than its steps say), A1111 goes back to
        # the first text: its reconstruct_cond_batch starts from index 0.
        return tuple(next((i for i, end in enumerate(ends) if step <= end), 0) for ends, _ in self.rows)

    def length_at(self, step: int) -> int:
        return max(tensor.shape[1] for (_, tensor) in self.rows)

    def at(self, step: int, length: int | None = None) -> torch.Tensor:
        """[rows, length, D] for model call `step`, each row padded with empty chunks to `length`."""
        key = (self._chosen(step), length)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        length = length or self.length_at(step)
        chosen = [tensor[index:index + 1] for index, (_, tensor) in zip(key[0], self.rows)]
        padded = [pad_with_empty(row, length, self.empty) for row in chosen]
        result = padded[0] if len(padded) == 1 else torch.cat(padded)
        self._last = (key, result)
        return result


class StepVectors:
    """The vector condition (SDXL's ``y``) that goes with each row of a StepConditioning: per row [k, V], one
    vector per text of the row, the one in use at each model call (GuidedDenoiser asks with ``at``)."""

    def __init__(self, text: StepConditioning, vectors: list[torch.Tensor]):
        self.text, self.vectors = text, vectors

    @property
    def parts(self):
        return self.text.parts

    def at(self, step: int, length: int | None = None) -> torch.Tensor:
        chosen = [vectors[index:index + 1] for index, vectors in zip(self.text._chosen(step), self.vectors)]
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen)


def pad_with_empty(row: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    missing = length - row.shape[1]
    if missing == 0:
        return row
    if missing % empty.shape[1]:
        raise ValueError(f"cannot pad {row.shape[1]} tokens to {length} with chunks of {empty.shape[1]}")
    return torch.cat([row, empty.to(row).repeat(row.shape[0], missing // empty.shape[1], 1)], dim=1)


class PromptConditioning:
    """A batch's prompts, not yet encoded: `scheduled(steps)` encodes them for a pass."""

    def __init__(self, conditioner: "Conditioner", prompts: list[str], composable: bool):
        self.conditioner, self.prompts = conditioner, list(prompts)
        self.parts = [split_and(prompt) if composable else [(prompt, 1.0)] for prompt in self.prompts]
        self.negative = not composable  # A1111 reads AND in prompts only; SDXL treats negative prompts apart
        self.size: SizeConditioning | None = None  # SDXL: None for the conditioner's

    def resized(self, size: SizeConditioning) -> "PromptConditioning":
        """These prompts with SDXL's size conditioning `size` (a hires pass's); other models ignore it."""
        copy = PromptConditioning.__new__(PromptConditioning)
        copy.__dict__.update(self.__dict__, size=size)
        return copy

    def scheduled(self, steps: int) -> StepConditioning | dict:
        """The StepConditioning (SDXL: with its vectors, {"c_crossattn": [...], "c_adm": ...})."""
        return self.conditioner.step_conditioning(self, steps)


class Conditioner:
    """Text conditioning for a run: prompts -> PromptConditioning, encoded when a pass needs it, cached.

    emphasis: A1111's "Emphasis" (prompt_encoding.EMPHASIS_MODES). clip_skip: A1111's (1 = the last
    layer). embeddings: an object with ``find_embedding(token_ids, position)`` (prompt_encoding's
    FindEmbedding), or None for no textual-inversion embeddings. size: SDXL's size micro-conditioning (None:
    the model's native size); other models have none.
    """

    def __init__(self, loaded, log, emphasis: str = "original", clip_skip: int = 1, embeddings=None,
                 size: SizeConditioning | None = None):
        self.loaded, self.log = loaded, log
        self.emphasis, self.clip_skip, self.embeddings = emphasis, clip_skip, embeddings
        self.size = size
        self.cache: dict[tuple, torch.Tensor] = {}
        self.pooled: dict[tuple, torch.Tensor] = {}  # SDXL: each group's pooled text output, as last encoded

    def __call__(self, prompts: list[str], composable: bool = False) -> PromptConditioning:
        """composable: read ``AND`` parts (prompts); a negative prompt has none, as in A1111."""
        return PromptConditioning(self, prompts, composable)

    def encoder(self):
        encoder = self.loaded.use("cond_stage_model")
        if getattr(encoder, "clip_skip", 1) != self.clip_skip:
            try:
                encoder.set_clip_skip(self.clip_skip)
            except ValueError as error:
                raise UserError(f"--clip_skip {self.clip_skip}: {error}; pass a smaller --clip_skip") from None
        return encoder

    def step_conditioning(self, prompts: PromptConditioning, steps: int) -> StepConditioning | dict:
        schedules = [[(prompt_schedule(text, steps), weight) for text, weight in parts] for parts in prompts.parts]
        empty = self.encode_group(("",))
        texts = tuple(parts[0][0][-1][1] for parts in schedules)
        # One batch, as the originals encode it, unless the "original" emphasis of different prompts would
        # then share one mean (A1111 encodes each prompt on its own).
        plain = all(len(parts) == 1 and weight == 1.0 and len(schedule) == 1
                    for parts in schedules for schedule, weight in parts) and (
            len(set(texts)) == 1 or not any("(" in text or "[" in text for text in texts))
        if plain:
            encoded = self.encode_group(texts)
            rows = [([steps], encoded[index:index + 1]) for index in range(len(texts))]
            groups = [(texts, slice(index, index + 1)) for index in range(len(texts))]
            image_parts = [[(index, 1.0)] for index in range(len(texts))]
        else:
            rows, groups, image_parts = [], [], []
            for parts in schedules:
                image_parts.append([])
                for schedule, weight in parts:
                    image_parts[-1].append((len(rows), weight))
                    group = tuple(text for _, text in schedule)
                    rows.append(([end for end, _ in schedule], self.encode_group(group)))
                    groups.append((group, slice(None)))
        if not isinstance(self.loaded.model.cond_stage_model, SDXLConditioner):
            return StepConditioning(rows, image_parts, empty)
        return self.with_vectors(rows, groups, image_parts, empty, prompts.negative, prompts.size or self.size)

    def with_vectors(self, rows: list, groups: list, image_parts: list, empty, negative: bool, size) -> dict:
        """SDXL's conditioning {"c_crossattn": [text], "c_adm": its vectors}; groups: per row, (the texts
        encoded together, the row's slice of them); size: the SizeConditioning (None: the native size's)."""
        conditioner = self.loaded.model.cond_stage_model
        values = (size or self.loaded.model.native_size_conditioning()).values(negative)
        vectors = []
        for index, (group, rows_of_group) in enumerate(groups):
            pooled = self.pooled[group][rows_of_group]
            if negative and not any(group):  # A1111's force_zero_embeddings for an empty negative prompt
                pooled = torch.zeros_like(pooled)
                rows[index] = (rows[index][0], torch.zeros_like(rows[index][1]))
            vectors.append(conditioner.vector(pooled, values))
        text = StepConditioning(rows, image_parts, empty)
        return {"c_crossattn": [text], "c_adm": StepVectors(text, vectors)}

    def encode_group(self, texts: tuple[str, ...]) -> torch.Tensor:
        """[len(texts), L, D]: the texts encoded as one batch (A1111 encodes an edited prompt's texts so,
        which matters for the mean that "original" emphasis restores), each group once per run."""
        if texts not in self.cache:
            encoder = self.encoder()
            text_encoders = getattr(encoder, "text_encoders", [encoder])  # SDXL's conditioner holds two
            keys = encoder.textual_inversion_keys() if hasattr(encoder, "textual_inversion_keys") else [None]
            encoded = [self.encode_with(text_encoder, texts, key) for text_encoder, key in zip(text_encoders, keys)]
            self.cache[texts] = encoded[0] if len(encoded) == 1 else torch.cat(encoded, dim=-1)
        return self.cache[texts]

    def encode_with(self, encoder, texts: tuple[str, ...], embedding_key: str | None = None) -> torch.Tensor:
        """One text encoder's weighted encoding of the texts; an encoder with a pooled output (SDXL's OpenCLIP)
        leaves that of the first chunk in self.pooled, as A1111 takes it. embedding_key: which vectors of SDXL
        embeddings this encoder takes ("clip_l", "clip_g"; None: SD's one set)."""
        find_embedding = getattr(self.embeddings, "find_embedding", None)
        if embedding_key is not None and self.embeddings is not None:
            find_embedding = self.embeddings.lookup_for(embedding_key)
        pad_token = encoder.pad_token
        chunk_length = min(CHUNK_LENGTH, encoder.max_length - 2)
        chunk_lists = []
        for text in texts:
            try:
                chunks, _ = prompt_chunks(text, pad_token, self.emphasis, chunk_length=chunk_length,
                                          find_embedding=find_embedding)
            except PromptSyntaxError as error:
                raise UserError(str(error)) from None
            chunk_lists.append(chunks)
        chunk_lists = pad_chunk_lists(chunk_lists, pad_token, chunk_length)
        if not hasattr(encoder, "last_pooled"):
            return encode_weighted(encoder.encode_tokens, chunk_lists, self.emphasis)

        pooled = []

        def encode_chunk(tokens, fixes):
            hidden = encoder.encode_tokens(tokens, fixes)
            pooled.append(encoder.last_pooled)
            return hidden

        encoded = encode_weighted(encode_chunk, chunk_lists, self.emphasis)
        self.pooled[texts] = pooled[0]
        return encoded


# The samplers A1111 marks "second_order" (two model calls a step): its schedules for them count twice the
# steps (SamplerData.total_steps), since its denoiser counts model calls.
SECOND_ORDER_SAMPLERS = frozenset({"heun", "dpm_2", "dpm_2_a", "dpmpp_2s_a", "dpmpp_sde"})


def schedule_steps(sampler: str, steps: int) -> int:
    """The number of steps A1111 builds prompt-editing schedules over for `steps` steps of `sampler`."""
    return steps * 2 if sampler in SECOND_ORDER_SAMPLERS else steps


def resolve(conditioning, steps: int):
    """`conditioning` (a Start's cond or uncond: a PromptConditioning, or a dict or list holding one) with
    every PromptConditioning encoded for a pass of `steps` steps."""
    if isinstance(conditioning, PromptConditioning):
        return conditioning.scheduled(steps)
    if isinstance(conditioning, dict):
        return {key: resolve(value, steps) for key, value in conditioning.items()}
    if isinstance(conditioning, (list, tuple)):
        return [resolve(value, steps) for value in conditioning]
    return conditioning
