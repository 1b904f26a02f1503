"""Reading A1111's `parameters` text back: a PNG's settings as options (`--from_png`).

The text is what ldm.generate.output.infotext writes and AUTOMATIC1111 writes and reads: the prompt (any
number of lines), an optional "Negative prompt:" line (and the lines after it), then one line of
`Key: value` pairs, values holding `,` `:` or a newline written as JSON strings. As A1111 reads it, the
last line is the parameters only when it holds at least 3 pairs; otherwise it belongs to the prompt.

`png_option_defaults` turns the fields into option defaults for a script's parser, so that a flag given on
the command line still wins over the PNG's value.
"""
import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ldm.generate.errors import UserError

# key: a word character, then words, spaces, '-' or '/'; value: a JSON string or anything up to the next comma
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE_PREFIX = "Negative prompt:"
MAX_TEXT_CHARS = 1_000_000  # a PNG text chunk far past any prompt is not a parameters text


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_parameters(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, {key: value string}) of an A1111 parameters text, as A1111 reads it."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {key: _unquote(value.strip()) for key, value in _PAIR.findall(last)}
    return "\n".join(prompt), "\n".join(negative), fields


def read_png_parameters(path) -> str:
    """The `parameters` text of a PNG (or any picture PIL reads that carries one); UserError if there is none."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except FileNotFoundError:
        raise UserError(f"--from_png {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"--from_png {path}: not a picture PIL can read ({error})") from None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--from_png {path} holds no A1111 parameters text: pass a PNG saved by A1111 or by us")
    if len(text) > MAX_TEXT_CHARS:
        raise UserError(f"--from_png {path}: its parameters text is over {MAX_TEXT_CHARS} characters: not one we read")
    return text


# A1111's field -> the options (argparse dests) it sets; values stay strings: argparse converts string defaults
# with the option's own type, so a bad value fails as it would on the command line. "WxH" fields set two.
FIELD_OPTIONS = {
    "Steps": ("ddim_steps",),
    "Sampler": ("sampler",),
    "Schedule type": ("schedule",),
    "CFG scale": ("scale",),
    "Seed": ("seed",),
    "Seed mode": ("seed_mode",),
    "Size": ("W", "H"),
    "Variation seed": ("subseed",),
    "Variation seed strength": ("subseed_strength",),
    "Seed resize from": ("seed_resize_from_w", "seed_resize_from_h"),
    "ENSD": ("ensd",),
    "Eta": ("eta",),
    "Eta DDIM": ("ddim_eta",),
    "Sigma churn": ("s_churn",),
    "Sigma tmin": ("s_tmin",),
    "Sigma tmax": ("s_tmax",),
    "Sigma noise": ("s_noise",),
    "Hires upscale": ("hr_scale",),
    "Hires resize": ("hr_resize_x", "hr_resize_y"),
    "Hires steps": ("hr_second_pass_steps",),
    "Hires upscaler": ("hr_upscaler",),
    "Hires prompt": ("hr_prompt",),
    "Hires negative prompt": ("hr_negative_prompt",),
    "Clip skip": ("clip_skip",),
    "RNG": ("rng",),
    "Token merging ratio": ("token_merging_ratio",),
    "Token merging ratio hr": ("token_merging_ratio_hr",),
    "DeepCache": ("deepcache",),
    "DeepCache schedule": ("deepcache_schedule",),
}
# Fields that describe the run rather than set an option: never reported as ignored.
DESCRIPTIVE_FIELDS = {"Model hash", "Model", "VAE hash", "VAE", "Version", "Batch size", "Batch pos",
                     "Lora hashes"}  # the prompt's <lora:...> tags bring the LoRAs back


def _option_values(key: str, value: str, dests: tuple) -> tuple:
    if len(dests) == 2:
        match = _SIZE.match(value)
        return match.groups() if match else (None, None)
    if key == "RNG":  # A1111's names; "GPU" is the card's own numbers, NVIDIA's on most of them: nv here
        value = value.strip().lower()
        return ("nv" if value == "gpu" else value,)
    return (value,)


def png_option_defaults(text: str, dests: set, log=print) -> dict:
    """{argparse dest: string value} for the options of `dests` that the parameters text sets.

    RNG: A1111 writes the field only when its source is not its default ("GPU", on the NVIDIA cards most
    images come from); we write it always, so a text without it is taken to be A1111's GPU noise: nv here.
    "Denoising strength" sets img2img's --strength, or txt2img's hires --denoising_strength. Fields no option
    of this script reads are named in one line, never silently dropped.
    """
    prompt, negative, fields = parse_parameters(text)
    fields.setdefault("RNG", "GPU")
    strength_dest = "strength" if "strength" in dests else "denoising_strength"
    table = {**FIELD_OPTIONS, "Denoising strength": (strength_dest,)}
    values, unused = {"prompt": prompt, "negative_prompt": negative}, []
    if "control_from_png" in dests:  # ControlNet units: their options, not their pictures (ldm.generate.control)
        from ldm.generate.control import png_units
        values["control_from_png"] = png_units(fields, log) or None
        fields = {key: value for key, value in fields.items() if not re.fullmatch(r"ControlNet \d+", key)}
    for key, value in fields.items():
        option_dests = table.get(key)
        if option_dests and set(option_dests) <= dests:
            values.update(zip(option_dests, _option_values(key, value, option_dests)))
        elif key not in DESCRIPTIVE_FIELDS:
            unused.append(key)
    if unused:
        log(f"note: the PNG's {', '.join(unused)} set nothing here: no option of this script takes them")
    return {dest: value for dest, value in values.items() if dest in dests and value is not None}


def parse_args_with_png(parser, argv=None):
    """parser.parse_args, with `--from_png FILE`'s parameters as the defaults of the options it sets."""
    args = parser.parse_args(argv)
    if getattr(args, "from_png", None) is None:
        return args
    dests = {action.dest for action in parser._actions} - {"from_png", "help"}
    parser.set_defaults(**png_option_defaults(read_png_parameters(args.from_png), dests))
    return parser.parse_args(argv)


def add_from_png_argument(parser):
    parser.add_argument("--from_png", metavar="PNG", default=None,
                        help="take the prompt and settings from a picture's A1111 parameters (ours or A1111's PNG "
                             "info); options given on the command line win over the picture's")
