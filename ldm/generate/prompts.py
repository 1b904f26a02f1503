"""Prompts from the command line or a file, cut into batches."""
from pathlib import Path

from ldm.generate.errors import UserError


def read_prompt_file(path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path} (pass --from-file with a text file, one prompt a line)") from None
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text (one prompt a line expected)") from None
    except OSError as error:
        raise UserError(f"cannot read prompt file {path}: {error.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts (one prompt a line; blank lines are skipped)")
    return prompts


def prompt_batches(prompt: str, prompt_file, batch_size: int, repeat: int = 1) -> list[list[str]]:
    """One batch of `batch_size` copies of the prompt, or the file's prompts (each `repeat` times) in
    batches of `batch_size`; the last batch may be smaller (the originals crash on it)."""
    if prompt_file:
        prompts = [p for p in read_prompt_file(prompt_file) for _ in range(repeat)]
    else:
        prompts = [prompt] * batch_size
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]


def truncation_warnings(prompts: list[str], token_counts: list[int], max_length: int = 77) -> list[str]:
    """One line per prompt that the text encoder cut."""
    warnings = []
    for prompt, count in zip(prompts, token_counts):
        if count > max_length:
            cut = count - max_length
            shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            warnings.append(f"warning: prompt {shown!r} is {count} tokens long; the last {cut} were cut "
                            f"(the text encoder reads {max_length} including start and end)")
    return warnings
