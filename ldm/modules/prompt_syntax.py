"""AUTOMATIC1111's prompt syntax, read as its web UI reads it (our own parsers, written from its rules).

Three independent readings of a prompt, applied in this order by A1111:

1. ``split_and``: composable diffusion, ``a cat AND a dog :0.5`` -> sub-prompts with weights.
2. ``prompt_schedule``: prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
   alternation ``[a|b]`` -> the text to use at each sampling step.
3. ``parse_attention``: emphasis ``(word)``, ``[word]``, ``(word:1.3)``, ``BREAK`` -> (text, weight)
   pieces, which the encoder turns into token weights.

A1111's quirks are kept on purpose (a prompt copied from its UI must mean the same here): they are
named where the code keeps them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# The piece that stands for BREAK in parse_attention's output, as A1111 writes it.
BREAK_PIECE = ("BREAK", -1.0)


class PromptSyntaxError(ValueError):
    """A prompt that A1111's parser would crash on (e.g. ``(word:1.2.3)``): named, not guessed at."""


# ----------------------------------------------------------------------------------------------
# Emphasis
# ----------------------------------------------------------------------------------------------

# One lexical unit of the emphasis syntax, tried in this order (the order decides, e.g. an escaped
# bracket before a bracket, and ":1.2)" before a lone ":").
ATTENTION_UNIT = re.compile(
    r"""
      \\[()\[\]\\]            # escaped bracket or backslash: the character itself
    | \\                      # any other backslash: dropped
    | [(\[]                   # opening bracket
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # explicit weight, closing a round bracket
    | [)\]]                   # closing bracket
    | [^\\()\[\]:]+           # text
    | :                       # a colon that sets no weight is text
    """,
    re.VERBOSE,
)
BREAK_SEPARATOR = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Pieces of ``text`` with their attention weights, as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by w;
    nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; a closing bracket with no
    opening one is literal text, an opening one never closed applies to the rest of the prompt.
    ``BREAK`` (a whole word, in capitals) becomes its own ``("BREAK", -1.0)`` piece (its weight is
    multiplied like any other, so a BREAK inside brackets stops being one, as in A1111). Neighbours of
    equal weight are merged; an empty prompt gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in ATTENTION_UNIT.finditer(text):
        unit, weight = match.group(0), match.group("weight")
        if unit.startswith("\\"):
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _weight_value(weight, text))
        elif unit == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif unit == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(BREAK_SEPARATOR.split(unit)):
                if i > 0:
                    pieces.append(list(BREAK_PIECE))
                pieces.append([part, 1.0])

    # Brackets left open: all round ones (outermost first), then all square ones, as A1111 does; the
    # order matters because it decides which float products come out equal and merge.
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not pieces:
        return [("", 1.0)]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(piece_text, weight) for piece_text, weight in merged]


def _weight_value(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:  # "[.\d]+" also matches "1.2.3" or "."; A1111 crashes on them
        raise PromptSyntaxError(
            f"prompt weight ':{weight})' in {prompt!r} is not a number; write it like (word:1.2)"
        ) from None


# ----------------------------------------------------------------------------------------------
# Composable prompts
# ----------------------------------------------------------------------------------------------

AND_SEPARATOR = re.compile(r"\bAND\b")
TRAILING_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts of a composable prompt and their weights, as A1111's ``get_multicond_prompt_list``.

    ``AND`` (a whole word, in capitals) separates sub-prompts; a sub-prompt ending in ``:number`` has
    that weight (1.0 otherwise). Trailing whitespace is dropped and leading whitespace kept, as A1111
    keeps it. A1111 reads the trailing ``:number`` even without any AND: ``a cat:2`` is "a cat" at 2.
    """
    result = []
    for sub_prompt in AND_SEPARATOR.split(prompt):
        text, weight = TRAILING_WEIGHT.match(sub_prompt).groups()  # the pattern matches any string
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


# ----------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ----------------------------------------------------------------------------------------------
#
# A1111's grammar (a lark grammar there; a recursive-descent parser here):
#
#   start      := (prompt | stray bracket or colon)*          "|" or a dangling "\" fail the parse
#   prompt     := (emphasized | scheduled | alternate | plain | whitespace)*
#   emphasized := "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled  := "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
#   alternate  := "[" prompt ("|" [prompt])+ "]"
#   plain      := (any character but \ [ ] ( ) : |  or  "\" followed by any character but a newline)+
#
# A prompt that fails to parse is used as it is, at every step. Where a bracket at the top level can
# be read both as syntax and as stray characters, ours always reads the syntax. A1111's parser (lark's
# Earley parser resolving the ambiguity) mostly does too, but a top-level group directly followed by
# stray brackets or colons is read as text or as syntax depending on how many follow ("[a:b:3]))" is
# text there, "[a:b:3])" and "[a:b:3])))" are not): an artifact of how lark picks among derivations,
# not a rule of the syntax, so it is not copied.

# lark's SIGNED_NUMBER, whose alternatives are tried in this order (first match, not longest).
NUMBER = r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)"
SCHEDULE_END = re.compile(r"\s*(" + NUMBER + r")\s*\]")
SPECIAL = set("\\[]():|")


@dataclass
class Scheduled:
    before: list | None  # None: nothing before the switch ([to:when])
    after: list
    when: str  # the number as written: "." in it decides fraction or step


@dataclass
class Alternate:
    options: list[list]


class _ScheduleParser:
    def __init__(self, text: str):
        self.text = text

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def plain_end(self, i: int) -> int:
        """End of the plain run starting at i (i itself when none starts there)."""
        while i < len(self.text):
            c = self.text[i]
            if c == "\\" and self.char(i + 1) not in ("", "\n"):
                i += 2
            elif c in SPECIAL:
                break
            else:
                i += 1
        return i

    def prompt(self, i: int) -> tuple[list, int]:
        """The longest prompt starting at i: its items and where it ends."""
        items: list = []
        while True:
            end = self.plain_end(i)
            if end > i:
                items.append(self.text[i:end])
                i = end
                continue
            group = self.group(i)
            if group is None:
                return items, i
            items.extend(group[0])
            i = group[1]

    def group(self, i: int) -> tuple[list, int] | None:
        """A bracketed element starting at i (its items, its end), or None if there is none."""
        c = self.char(i)
        if c == "(":
            inner, j = self.prompt(i + 1)
            if self.char(j) == ")":
                return ["(", *inner, ")"], j + 1
            if self.char(j) == ":":
                weight, k = self.prompt(j + 1)
                if self.char(k) == ")":
                    return ["(", *inner, ":", *weight, ")"], k + 1
            return None
        if c != "[":
            return None
        first, j = self.prompt(i + 1)
        if self.char(j) == "]":
            return ["[", *first, "]"], j + 1
        if self.char(j) == "|":
            options = [first]
            while self.char(j) == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            return ([Alternate(options)], j + 1) if self.char(j) == "]" else None
        if self.char(j) != ":":
            return None
        end = SCHEDULE_END.match(self.text, j + 1)
        if end:  # [to:when]
            return [Scheduled(None, first, end.group(1))], end.end()
        second, k = self.prompt(j + 1)
        end = SCHEDULE_END.match(self.text, k + 1) if self.char(k) == ":" else None
        if end:  # [from:to:when]
            return [Scheduled(first, second, end.group(1))], end.end()
        return None

    def start(self) -> list | None:
        """The whole text's items, or None when A1111's parser would reject it."""
        items: list = []
        i = 0
        while i < len(self.text):
            prompt, i = self.prompt(i)
            items.extend(prompt)
            if i == len(self.text):
                break
            if self.text[i] in "[]():":  # a bracket that closes nothing, or one that opens no syntax
                items.append(self.text[i])
                i += 1
            else:  # "|" outside an alternation, or a backslash at the end or before a newline
                return None
        return items


def _switch_step(when: str, steps: int, base_steps: int, hires: bool, old_scheduling: bool) -> int:
    value = float(when)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in when:  # a fraction of the steps; in a hires pass 1.0 is the end of the first pass
        value = (value - (1.0 if hires else 0.0)) * steps
    else:  # a step; in a hires pass counted on from the first pass's steps
        value = value - (base_steps if hires else 0)
    if math.isinf(value):  # e.g. 1e999; A1111 crashes on it
        return steps if value > 0 else -1
    return min(steps, int(value))


def _collect_switches(items: list, steps: int, switch_step) -> set[int]:
    found = set()
    for item in items:
        if isinstance(item, Scheduled):
            when = switch_step(item.when)
            if when >= 1:
                found.add(when)
            found |= _collect_switches((item.before or []) + item.after, steps, switch_step)
        elif isinstance(item, Alternate):
            found.update(range(1, steps + 1))
            for option in item.options:
                found |= _collect_switches(option, steps, switch_step)
    return found


def _text_at(items: list, step: int, switch_step) -> str:
    parts = []
    for item in items:
        if isinstance(item, Scheduled):
            chosen = (item.before or []) if step <= switch_step(item.when) else item.after
            parts.append(_text_at(chosen, step, switch_step))
        elif isinstance(item, Alternate):
            parts.append(_text_at(item.options[(step - 1) % len(item.options)], step, switch_step))
        else:
            parts.append(item)
    return "".join(parts)


def prompt_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The prompt's texts over the sampling steps, as A1111's ``get_learned_conditioning_prompt_schedules``.

    Returns ``[(end_step, text), ...]`` sorted by step: ``text`` is used for steps up to and including
    ``end_step`` (steps count from 1), the last entry ends at the last step.

    ``when`` written with a "." is a fraction of the steps (``0.25``; ``1.5`` is past the end, so never
    switches), without one a step number. With ``hires_steps`` (the schedule of a hires-fix second
    pass of ``hires_steps`` steps after ``steps`` base steps) fractions count from 1.0 and step numbers
    from ``steps``. ``use_old_scheduling`` is A1111's compatibility option: a ``when`` below 1 is a
    fraction, anything else a step.
    """
    hires = hires_steps is not None and not use_old_scheduling
    total = hires_steps if hires else steps

    def switch_step(when: str) -> int:
        return _switch_step(when, total, steps, hires, use_old_scheduling)

    items = _ScheduleParser(prompt).start()
    if items is None:
        return [(total, prompt)]
    ends = sorted(_collect_switches(items, total, switch_step) | {total})
    return [(end, _text_at(items, end, switch_step)) for end in ends]
