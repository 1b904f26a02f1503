"""A1111's extra-network tags in prompts (`<lora:name:weight>`), the LoRA files they name, and their use in a run.

Tags, as A1111 reads them (modules/extra_networks.py, extensions-builtin/Lora/extra_networks_lora.py): any
`<kind:arg1:arg2...>` with `kind` a word is taken out of the text the encoder sees; `lora` and its alias
`lyco` name a LoRA. Arguments split at `:`; one holding a single `=` is named. The first positional
argument is the name, the second the text encoder's weight (default 1.0), the third the UNet's (default:
the text encoder's); `te=` and `unet=` override them. So `<lora:x:0.8:0.5>` is text encoder 0.8, UNet 0.5.
The infotext keeps the prompt as written.

Names are file stems anywhere under --lora_dir (A1111's: .safetensors, .pt, .ckpt), or the `ss_output_name`
of a file's metadata (kohya's trainer writes it). `--lora PATH[:WEIGHT]` adds a file to every prompt.

A batch's LoRAs are its first prompt's (A1111's rule: the weights are merged into the one model, so a
batch has one set), its negative prompt's and --lora's. Every file the run names is read before the model
is loaded: a missing name or bad file is one line and exit 2, or, with --skip_bad_lora, a line and the run
goes on without it.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ldm.generate.errors import UserError
from ldm.generate.output import file_sha256
from ldm.modules.lora import LoraError, LoraPatcher, read_lora
from ldm.safetensors_reader import SafetensorsError, read_header

EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # A1111 registers lyco as an alias of lora
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
DEFAULT_LORA_DIR = Path("models/Lora")
SHORT_HASH_DIGITS = 12  # A1111's LoRA "shorthash"
INFOTEXT_NAME_SYMBOLS = str.maketrans("", "", ":,")  # A1111 drops these from a name in "Lora hashes"


@dataclass(frozen=True)
class LoraTag:
    """One LoRA a prompt asks for. name: as written (a file stem, an alias, or --lora's file stem)."""
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # what the text encoder sees: the prompt without its tags
    loras: tuple = ()  # of LoraTag, in the prompt's order
    ignored: tuple = ()  # tags of other kinds (hypernet, ...), taken out as A1111 does but used for nothing


def _weight(value: str, tag: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise UserError(f"{tag}: {value.strip()!r} is not a number: write a weight such as 0.8") from None
    if not math.isfinite(weight):
        raise UserError(f"{tag}: the weight {value.strip()!r} is not a finite number: write a weight such as 0.8")
    return weight


def lora_tag(arguments: str, tag: str) -> LoraTag:
    """The LoraTag of a tag's arguments (`name:te:unet`, `name:te=..:unet=..`), as A1111's ExtraNetworkLora
    reads them."""
    positional, named = [], {}
    for item in arguments.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise UserError(f"{tag} names no LoRA: write <lora:NAME:WEIGHT>")
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 3:
        extra = ", ".join(sorted(f"{key}=" for key in unknown)) or f"a fourth value {positional[3]!r}"
        raise UserError(f"{tag}: {extra} is not supported here (dynamic rank, dyn=, is A1111's only other "
                        "argument): write <lora:NAME:TE_WEIGHT:UNET_WEIGHT> or te=/unet=")
    te_weight = _weight(positional[1], tag) if len(positional) > 1 else 1.0
    te_weight = _weight(named["te"], tag) if "te" in named else te_weight
    unet_weight = _weight(positional[2], tag) if len(positional) > 2 else te_weight
    unet_weight = _weight(named["unet"], tag) if "unet" in named else unet_weight
    return LoraTag(name, te_weight, unet_weight)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The prompt without its extra-network tags (A1111 replaces each by nothing), and the LoRAs they ask for."""
    loras, ignored = [], []

    def take_out(match):
        kind, arguments = match.group(1), match.group(2)
        if kind in LORA_KINDS:
            loras.append(lora_tag(arguments, match.group(0)))
        else:
            ignored.append(match.group(0))
        return ""

    text = EXTRA_NETWORK_TAG.sub(take_out, prompt)
    return ParsedPrompt(text, tuple(loras), tuple(ignored))


def cli_lora(value: str) -> tuple[Path, float]:
    """--lora PATH[:WEIGHT] -> (path, weight); a colon not followed by a number belongs to the path."""
    path, colon, weight = value.rpartition(":")
    if colon:
        try:
            number = float(weight)
        except ValueError:
            return Path(value), 1.0
        if not math.isfinite(number):
            raise UserError(f"--lora {value}: the weight {weight!r} is not a finite number")
        return Path(path), number
    return Path(value), 1.0


def lora_short_hash(path: Path, metadata: dict | None = None) -> str:
    """A1111's LoRA shorthash: the file's `sshs_model_hash` metadata, else the sha256 of a .safetensors file's
    tensor data (after its header; kohya's "addnet" hash, unchanged by edits of the metadata) or of a whole
    .pt/.ckpt file; the first 12 hex digits."""
    recorded = (metadata or {}).get("sshs_model_hash")
    if recorded:
        return str(recorded)[:SHORT_HASH_DIGITS]
    start = 0
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as file:
            start = 8 + int.from_bytes(file.read(8), "little")
    return file_sha256(path, start)[:SHORT_HASH_DIGITS]


def _metadata(path: Path) -> dict:
    """A .safetensors file's metadata; {} for other files and for unreadable ones (read_lora names the problem)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        return read_header(path).metadata
    except (SafetensorsError, OSError):
        return {}


class LoraFolder:
    """--lora_dir: the LoRA files under it (subfolders too), by file stem and by their ss_output_name alias."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._by_name: dict | None = None

    def _index(self) -> dict:
        if self._by_name is None:
            files = sorted(path for path in self.folder.rglob("*") if path.suffix.lower() in LORA_EXTENSIONS
                           and path.is_file()) if self.folder.is_dir() else []
            aliases = {}
            for path in files:
                alias = _metadata(path).get("ss_output_name")
                if alias:
                    aliases.setdefault(str(alias), path)
            self._by_name = {**aliases, **{path.stem: path for path in files}}  # a file's own name wins
        return self._by_name

    def find(self, name: str) -> Path:
        path = self._index().get(name)
        if path is None:
            where = "" if self.folder.is_dir() else ", which does not exist"
            raise UserError(f"no LoRA named {name!r} in {self.folder}{where}: put {name}.safetensors there, or "
                            "pass --lora_dir FOLDER")
        return path


@dataclass(frozen=True)
class ReadLora:
    lora_file: object  # ldm.modules.lora.LoraFile
    short_hash: str


@dataclass
class LoraChoice:
    """A LoRA file ready to apply: the file read, its weights, and what the infotext calls it."""
    name: str
    lora_file: object  # ldm.modules.lora.LoraFile
    te_weight: float
    unet_weight: float
    short_hash: str

    def key(self):
        return (str(self.lora_file.path), self.te_weight, self.unet_weight)


@dataclass
class BatchNetworks:
    """What one batch asks for: the text the encoder sees and the LoRAs to apply."""
    prompts: list
    negative_prompt: str
    loras: list = field(default_factory=list)  # of LoraChoice

    def key(self) -> tuple:
        return tuple(choice.key() for choice in self.loras)

    def infotext_fields(self) -> dict:
        """A1111's "Lora hashes": `name: hash` of each LoRA used, in order, each name once."""
        hashes = {}
        for choice in self.loras:
            hashes.setdefault(choice.name.translate(INFOTEXT_NAME_SYMBOLS), choice.short_hash)
        return {"Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in hashes.items())} if hashes else {}


class PromptNetworks:
    """The LoRAs of a run: --lora's files and the prompts' tags, checked and read once (`check`, before the
    model is loaded), then given batch by batch (`for_batch`)."""

    def __init__(self, lora_dir=DEFAULT_LORA_DIR, cli_loras=(), skip_bad: bool = False, log=print):
        self.folder = LoraFolder(lora_dir)
        self.cli_loras = [cli_lora(value) if isinstance(value, str) else value for value in cli_loras]
        self.skip_bad, self.log = skip_bad, log
        self._files: dict = {}  # name or path -> ReadLora, or None for a file skipped
        self._said: set = set()

    @classmethod
    def from_args(cls, args, log=print) -> "PromptNetworks":
        return cls(args.lora_dir, args.lora or (), args.skip_bad_lora, log)

    def check(self, batches: list, negative_prompt: str):
        """Read every LoRA the run names, in order; UserError for the first bad one unless skip_bad."""
        for path, _ in self.cli_loras:
            self._read(str(path), path)
        for prompt in [negative_prompt, *(prompt for batch in batches for prompt in batch)]:
            for tag in parse_prompt(prompt).loras:
                self._lookup(tag.name)

    def _lookup(self, name: str):
        if name not in self._files:
            try:
                path = self.folder.find(name)
            except UserError as error:
                self._refuse(name, str(error))
                return None
            self._read(name, path)
        return self._files[name]

    def _read(self, key: str, path: Path):
        if key in self._files:
            return self._files[key]
        try:
            entry = ReadLora(read_lora(path), lora_short_hash(Path(path), _metadata(Path(path))))
        except (LoraError, OSError) as error:
            self._refuse(key, str(error) if isinstance(error, LoraError) else f"cannot read LoRA {path}: {error}")
            return None
        self._files[key] = entry
        return entry

    def _refuse(self, key: str, line: str):
        if not self.skip_bad:
            raise UserError(line)
        self._files[key] = None
        self._say_once(f"warning: {line}; going on without it (--skip_bad_lora)")

    def refuse_unusable(self, lora_file, line: str):
        """A file found not to fit the model once it is loaded (no key matches it): UserError, or skipped."""
        for key, entry in list(self._files.items()):
            if entry is not None and entry.lora_file is lora_file:
                self._refuse(key, line)

    def for_batch(self, prompts: list, negative_prompt: str) -> BatchNetworks:
        parsed = [parse_prompt(prompt) for prompt in prompts]
        negative = parse_prompt(negative_prompt)
        for tag in dict.fromkeys(tag for prompt in [*parsed, negative] for tag in prompt.ignored):
            self._say_once(f"note: {tag} is not a LoRA tag: taken out of the prompt and not used (only <lora:...> "
                       "and <lyco:...> networks are supported)")
        if any(prompt.loras != parsed[0].loras for prompt in parsed[1:]):
            self._say_once("note: the prompts of a batch ask for different LoRAs; as in A1111 the batch uses its first "
                       "prompt's (put prompts with other LoRAs in another batch: --n_samples 1)")
        choices = []
        for path, weight in self.cli_loras:
            entry = self._read(str(path), path)
            if entry is not None:
                choices.append(LoraChoice(Path(path).stem, entry.lora_file, weight, weight, entry.short_hash))
        for tag in (*(parsed[0].loras if parsed else ()), *negative.loras):
            entry = self._lookup(tag.name)
            if entry is not None:
                choices.append(LoraChoice(tag.name, entry.lora_file, tag.te_weight, tag.unet_weight, entry.short_hash))
        return BatchNetworks([prompt.text for prompt in parsed], negative.text, choices)

    def _say_once(self, line: str):
        if line not in self._said:
            self._said.add(line)
            self.log(line)


class AppliedNetworks:
    """The LoRAs merged into a loaded model: each file checked against the model before sampling, the set
    re-applied when a batch asks for another, the weights restored at the end."""

    def __init__(self, loaded, networks: PromptNetworks, log=print):
        self.loaded, self.networks, self.log = loaded, networks, log
        self.patcher = None
        self.current: tuple = ()
        self._said: set = set()

    def _say_once(self, line: str):
        if line not in self._said:
            self._said.add(line)
            self.log(f"warning: {line}")

    def _patcher(self):
        if self.patcher is None:
            self.patcher = LoraPatcher(self.loaded.model, log=self._say_once)
        return self.patcher

    def check(self, batches: list, negative_prompt: str):
        """Merge each LoRA file the run uses alone, then restore: a file that does not fit the model, or matches
        none of its layers, is refused (UserError, or skipped with --skip_bad_lora) before anything is sampled."""
        files = {}
        for batch in batches:
            for choice in self.networks.for_batch(batch, negative_prompt).loras:
                files.setdefault(id(choice.lora_file), choice.lora_file)
        try:
            for lora_file in files.values():
                try:
                    result = self._patcher().apply([(lora_file, 1.0, 1.0)])
                except LoraError as error:
                    self.networks.refuse_unusable(lora_file, str(error))
                    continue
                if not result.merged.get(lora_file.name):
                    self.networks.refuse_unusable(lora_file, f"LoRA file {lora_file.path} matches no layer of this "
                                                             "model: use a LoRA made for it")
        finally:
            self.restore()

    def apply(self, batch: BatchNetworks) -> bool:
        """Make the model's weights `batch`'s; True when they changed (cached text conditioning is then stale)."""
        if batch.key() == self.current:
            return False
        self._patcher().apply([(choice.lora_file, choice.unet_weight, choice.te_weight) for choice in batch.loras])
        self.current = batch.key()
        return True

    def restore(self):
        if self.patcher is not None:
            self.patcher.restore()
        self.current = ()
