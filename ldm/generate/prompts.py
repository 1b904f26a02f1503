"""Prompts from the command line or a file, cut into batches."""
import stat
from pathlib import Path

from ldm.generate.errors import UserError

MAX_PROMPT_FILE_BYTES = 16 * 1024 ** 2  # about 200 000 prompts of a typical length
MAX_IMAGES = 100_000  # one run's images, as numbered files in one folder


def read_prompt_file(path) -> list[str]:
    """The file's prompts, one a line, blank lines skipped; a UTF-8 byte order mark at its start is dropped.

    Refused in one line: a missing file, a directory or a device, more than MAX_PROMPT_FILE_BYTES (read no
    further than that, so a pipe that never ends cannot exhaust memory), binary data, text not in UTF-8."""
    path = Path(path)
    hint = "(pass --from-file with a text file, one prompt a line)"
    try:
        kind = path.stat().st_mode
        if stat.S_ISDIR(kind):
            raise UserError(f"prompt file {path} is a directory {hint}")
        if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            raise UserError(f"prompt file {path} is a device, not a text file {hint}")
        with open(path, "rb") as file:
            data = file.read(MAX_PROMPT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path} {hint}") from None
    except OSError as error:
        raise UserError(f"cannot read prompt file {path}: {error.strerror}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise UserError(f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES // 1024 ** 2} MiB: split it "
                        "into several runs")
    if b"\0" in data:
        raise UserError(f"prompt file {path} holds binary data (a NUL byte at offset {data.index(0)}), not text {hint}")
    try:
        text = data.decode("utf-8-sig")  # "-sig": a byte order mark is not part of the first prompt
    except UnicodeDecodeError as error:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {error.start}) {hint}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts (one prompt a line; blank lines are skipped)")
    return prompts


def prompt_batches(prompt: str, prompt_file, batch_size: int, repeat: int = 1) -> list[list[str]]:
    """One batch of `batch_size` copies of the prompt, or the file's prompts (each `repeat` times) in
    batches of `batch_size`; the last batch may be smaller (the originals crash on it)."""
    if prompt_file:
        lines = read_prompt_file(prompt_file)
        if len(lines) * repeat > MAX_IMAGES:
            raise UserError(f"{len(lines)} prompts x --repeat {repeat} is more than the {MAX_IMAGES} images one "
                            "run makes: use fewer, or several runs")
        prompts = [p for p in lines for _ in range(repeat)]
    else:
        prompts = [prompt] * batch_size
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

