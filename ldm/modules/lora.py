"""LoRA and LyCORIS files merged into our weights, and taken out again bit for bit.

Formats (the delta of each layer as A1111's extensions-builtin/Lora computes it):
- kohya-ss LoRA/LoCon: `<layer>.lora_down.weight`, `.lora_up.weight`, optional `.lora_mid.weight`
  (LyCORIS's Tucker core for convolutions), `.alpha`; delta = up @ down x alpha / rank.
- LyCORIS LoHa: `hada_w1_a/b`, `hada_w2_a/b` (optional `hada_t1/t2`); delta = (w1a @ w1b) * (w2a @ w2b).
- LyCORIS LoKr: `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b` (optional `lokr_t2`); delta =
  kron(w1, w2).
- diffusers/PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (or the older `.down/.up.weight`), alpha
  from a `.alpha` tensor or the file's `lora_adapter_metadata`, else alpha = rank (scale 1).
Merging adds delta x the user's weight to the weight in fp32 and casts back; the replaced tensors are kept
as they were, so that restoring is exact. Nothing in a file runs code: .safetensors through our reader,
pickles with torch.load(weights_only=True).
"""
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import load_pickle_weights
from ldm.modules.diffusionmodules.util import forget_weight_copies
from ldm.modules.lora_keys import KOHYA_TEXT2, TEXT_NAMES, canonical_name, lora_targets
from ldm.safetensors_reader import SafetensorsError, read_safetensors

PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
         "down.weight", "up.weight", "alpha", "scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
         "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SAME_PART = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
             "down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}  # by the width of the
# text encoder and of cross-attention; a file with lora_te2_ layers is SDXL's whatever its first layer's width


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message is one line naming the file and the fix."""


def rebuild_tucker(core, up, down):
    """A Tucker-decomposed kernel (LyCORIS `lora_mid`, `hada_t*`, `lokr_t2`): [out, in, k, k]."""
    return torch.einsum("i j k l, p i, j r -> p r k l", core, up.flatten(1), down.flatten(1))


@dataclass
class LoraLayer:
    """The tensors one file holds for one layer of the model, by their part names."""
    name: str  # canonical: lora_unet_... or lora_te_...
    parts: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if "hada_w1_a" in self.parts:
            return "LoHa"
        if any(part.startswith("lokr_") for part in self.parts):
            return "LoKr"
        return "LoRA"

    def rank(self) -> int | None:
        """The dimension alpha is divided by (None: the layer has no low-rank factor, scale 1)."""
        for part in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if part in self.parts:
                return self.parts[part].shape[0]
        return None

    def scale(self, default_alpha: float | None) -> float:
        if "scale" in self.parts:
            return float(self.parts["scale"])
        alpha = float(self.parts["alpha"]) if "alpha" in self.parts else default_alpha
        rank = self.rank()
        return alpha / rank if alpha is not None and rank else 1.0

    def delta(self, device=None) -> torch.Tensor:
        """The unscaled weight change in fp32, in the shape the factors give (reshaped by the caller);
        on the meta device, only its shape (and a factor mismatch raises RuntimeError)."""
        p = {name: tensor.to(device=device, dtype=torch.float32) for name, tensor in self.parts.items()
             if name not in ("alpha", "scale")}
        if self.kind == "LoHa":
            first = self._product(p, "hada_w1_a", "hada_w1_b", "hada_t1")
            return first * self._product(p, "hada_w2_a", "hada_w2_b", "hada_t2")
        if self.kind == "LoKr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else self._product(p, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2)
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        if "lora_mid.weight" in p:
            return rebuild_tucker(p["lora_mid.weight"], up, down)
        product = up.flatten(1) @ down.flatten(1)
        return product.view(product.shape[0], *down.shape[1:]) if down.dim() == 4 else product

    @staticmethod
    def _product(p: dict, a: str, b: str, core: str) -> torch.Tensor:
        if core in p:  # LyCORIS's Tucker form (A1111's make_weight_cp): a is [rank, out], b is [rank, in]
            return torch.einsum("i j k l, j r, i p -> p r k l", p[core], p[b], p[a])
        product = p[a] @ p[b].flatten(1)
        return product.view(product.shape[0], *p[b].shape[1:]) if p[b].dim() == 4 else product

    def check(self, path: Path) -> None:
        needed = {"LoHa": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "LoKr": (),
                  "LoRA": ("lora_down.weight", "lora_up.weight")}[self.kind]
        missing = [part for part in needed if part not in self.parts]
        if self.kind == "LoKr" and not (("lokr_w1" in self.parts or "lokr_w1_a" in self.parts)
                                         and ("lokr_w2" in self.parts or "lokr_w2_a" in self.parts)):
            missing.append("lokr_w1/lokr_w2")
        if missing:
            raise LoraError(f"LoRA file {path} is incomplete: layer {self.name} lacks {', '.join(missing)}; "
                            "download it again")
        try:
            self.delta("meta")
        except RuntimeError as error:
            raise LoraError(f"LoRA file {path} is corrupt: the factors of layer {self.name} do not fit together "
                            f"({str(error).splitlines()[0][:100]}); download it again") from None


@dataclass
class LoraFile:
    path: Path
    layers: dict  # canonical name -> LoraLayer
    not_understood: list  # keys that name no LoRA part
    default_alphas: dict  # "unet"/"te" -> alpha from the file's metadata (PEFT), or None
    family: str | None  # "SD 1.x"/"SD 2.x" as the shapes say, None when they do not tell

    @property
    def name(self) -> str:
        return self.path.stem


def read_lora(path) -> LoraFile:
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    layers, not_understood = {}, []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            not_understood.append(key)
            continue
        layer, part = split
        layers.setdefault(layer, LoraLayer(layer)).parts[SAME_PART.get(part, part)] = tensor
    if not layers:
        raise LoraError(f"{path} holds no LoRA layers (no lora_unet_/lora_te_ or unet./text_encoder. keys): "
                        "pass a LoRA or LyCORIS file")
    for layer in layers.values():
        layer.check(path)
    return LoraFile(path, layers, not_understood, _metadata_alphas(metadata), _family(layers))


def _read_tensors(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path} (check the name and --lora_dir)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        obj = load_pickle_weights(path, LoraError, f"LoRA file {path}", "use a .safetensors file or one from a "
                                  "trusted source", f"LoRA file {path}", "download or copy it again")
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LoraError(f"LoRA file {path} does not hold a dictionary of tensors: pass a LoRA file")
        return obj, {}
    try:
        return read_safetensors(path)
    except SafetensorsError as error:
        raise LoraError(f"unusable LoRA file {error} (a damaged file: download or copy it again)") from None


def _split_key(key: str) -> tuple[str, str] | None:
    for part in PARTS:
        if key.endswith("." + part):
            layer = canonical_name(key[: -len(part) - 1])
            return (layer, part) if layer is not None else None
    return None


def _metadata_alphas(metadata: dict) -> dict:
    """diffusers writes PEFT's adapter config as JSON: {"unet.lora_alpha": 8, "text_encoder.lora_alpha": ...}."""
    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        adapter = {}
    return {"unet": adapter.get("unet.lora_alpha"), "te": adapter.get("text_encoder.lora_alpha"),
            "te2": adapter.get("text_encoder_2.lora_alpha")}


def _family(layers: dict) -> str | None:
    """The family whose text width the file's text-encoder layers, or cross-attention keys/values, take."""
    if any(name.startswith(KOHYA_TEXT2) for name in layers):
        return "SDXL"
    for name, layer in layers.items():
        if name.endswith(("_self_attn_q_proj", "_attn2_to_k", "_attn2_to_v")):
            width = layer.delta("meta").shape[1]
            return FAMILIES.get(width, f"a model with {width}-wide text")
    return None


@dataclass
class LoraResult:
    """What an apply did: per file, the layers merged and the names that matched nothing."""
    merged: dict = field(default_factory=dict)  # file name -> layer count
    unmatched: dict = field(default_factory=dict)  # file name -> list of keys

    def report(self) -> str | None:
        """One line on what matched nothing, or None when everything was used."""
        counts = [f"{name}: {len(keys)} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                  for name, keys in self.unmatched.items() if keys]
        if not counts:
            return None
        return "LoRA keys that match no layer of this model were ignored: " + "; ".join(counts)


class LoraPatcher:
    """Merges LoRA files into a LatentDiffusion's weights and restores them.

    `apply` replaces each changed parameter's tensor by a merged copy and keeps the tensor it replaced (the
    original itself, not a copy), so restoring is exact and a weight that is a view of a memory-mapped
    checkpoint is never written to. With --lowmem, `select` chooses the set without touching the weights
    and `apply_to_component` merges it into each component right after OneComponentAtATime converts it:
    that copy is the run's own and is dropped on release, so it is changed in place and nothing is kept.
    """

    def __init__(self, model: nn.Module, log=print):
        self.model, self.log = model, log
        self.targets = lora_targets(model)
        self.originals = {}  # parameter name -> (the parameter, its tensor before merging)
        # id -> weak reference of the converted parameters apply_to_component has changed (tensors compare
        # elementwise, so no WeakSet; a dead reference means the id may be a new parameter's)
        self.merged_in_place = {}
        self.current = []  # the [(LoraFile, unet weight, text weight)] selected
        self.deltas = {}  # parameter name -> {rows or None: fp32 delta} of the current set
        self.result = LoraResult()

    def apply(self, loras: list) -> LoraResult:
        """Merge exactly `loras` ([(LoraFile, unet_weight, text_weight), ...]) into the model's weights; a
        different set merged before is taken out first, the same set again changes nothing."""
        if self._same_set(loras) and self.originals:
            return self.result
        result = self.select(loras)
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, parts in self.deltas.items():
                parameter = parameters[name]
                self.originals[name] = (parameter, parameter.data)
                parameter.data = self._merged(parameter.data.clone(memory_format=torch.preserve_format), parts)
        forget_weight_copies(self.model)  # a merged copy may land where the last one was freed
        return result

    def select(self, loras: list) -> LoraResult:
        """Restore the weights, then make `loras` the set to merge; logs what matched nothing."""
        if self._same_set(loras):
            return self.result
        self.restore()
        self.result, self.deltas = self._deltas(loras)
        self.current = list(loras)
        message = self.result.report()
        if message:
            self.log(message)
        return self.result

    def apply_to_component(self, name: str, module: nn.Module) -> None:
        """Merge the selected set, in place, into `module`, the component `name` of the model just
        converted by OneComponentAtATime (a copy of the file's weights that is the run's own)."""
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters(prefix=name):
                parts = self.deltas.get(parameter_name)
                merged_before = self.merged_in_place.get(id(parameter))
                if parts is not None and (merged_before is None or merged_before() is not parameter):
                    self._merged(parameter.data, parts)
                    self.merged_in_place[id(parameter)] = weakref.ref(parameter)
        forget_weight_copies(module)

    def restore(self) -> None:
        """Put back every tensor `apply` replaced, bit for bit, and select no LoRA."""
        for parameter, original in self.originals.values():
            parameter.data = original
        forget_weight_copies(self.model)
        self.originals, self.deltas, self.current, self.merged_in_place = {}, {}, [], {}
        self.result = LoraResult()

    def _same_set(self, loras: list) -> bool:
        def identities(selection):
            return [(id(lora), *weights) for lora, *weights in selection]
        return identities(loras) == identities(self.current)

    @staticmethod
    def _merged(weight: torch.Tensor, parts: dict) -> torch.Tensor:
        for rows, delta in parts.items():
            part = weight if rows is None else weight[rows[0]:rows[1]]
            part.copy_(part.float() + delta.to(part.device))
        return weight

    def _deltas(self, loras: list) -> tuple[LoraResult, dict]:
        """{parameter name: {rows or None: fp32 delta x scale x weight}}, summed over the files."""
        result, deltas = LoraResult(), {}
        parameters = dict(self.model.named_parameters())
        for lora, unet_weight, text_weight in loras:
            unmatched, merged = list(lora.not_understood), 0
            for name, layer in lora.layers.items():
                target = self.targets.get(name)
                if target is None:
                    unmatched.append(name)
                    continue
                text = name.startswith(TEXT_NAMES)
                weight = text_weight if text else unet_weight
                if weight == 0:
                    continue
                shape = parameters[target.parameter_name].shape
                if target.rows is not None:
                    shape = torch.Size((target.rows[1] - target.rows[0], *shape[1:]))
                delta = layer.delta()
                if delta.numel() != shape.numel():
                    raise LoraError(self._wrong_model(lora, name, delta.shape, shape))
                alphas = "te2" if name.startswith(KOHYA_TEXT2) else "te" if text else "unet"
                delta = delta.reshape(shape) * (layer.scale(lora.default_alphas.get(alphas)) * weight)
                parts = deltas.setdefault(target.parameter_name, {})
                parts[target.rows] = parts[target.rows] + delta if target.rows in parts else delta
                merged += 1
            result.merged[lora.name] = merged
            result.unmatched[lora.name] = unmatched
        return result, deltas

    @staticmethod
    def _wrong_model(lora: LoraFile, name: str, got, expected) -> str:
        family = f" (it is for {lora.family})" if lora.family else ""
        return (f"LoRA file {lora.path} does not fit this model{family}: layer {name} changes a "
                f"{list(got)} weight, the model's is {list(expected)}; use a LoRA made for this model")
