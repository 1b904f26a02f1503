"""Where the layers a LoRA file names live in our CompVis-named models.

LoRA files name diffusers' modules: kohya-ss writes `lora_unet_down_blocks_0_attentions_0_proj_in` and
`lora_te_text_model_encoder_layers_0_self_attn_q_proj` (the module path with dots as underscores), PEFT
and diffusers write `unet.down_blocks.0.attentions.0.proj_in` and `text_encoder.text_model...`. Our
models keep the original CompVis/Stability layout (`input_blocks.1.1.proj_in`, and for SD 2.x OpenCLIP's
fused `in_proj_weight` whose rows are q, k, v). The table is built by walking our own UNet level by level
(the same walk diffusers' conversion makes from the config's levels), so any channel_mult,
num_res_blocks or attention placement is covered, the tiny test models included.

Every name is brought to one canonical spelling, `lora_unet_<path with underscores>` or
`lora_te_<path with underscores>`; the table also accepts our own module paths spelt that way (what
A1111 accepts for files trained on the CompVis layout).

SDXL (a conditioner of several text encoders): kohya-ss writes the UNet in the original layout
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, our own names) or in diffusers' (files
converted from diffusers), and the text encoders as `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP
ViT-bigG, transformers' names); diffusers/PEFT write `text_encoder.` and `text_encoder_2.`. The first
encoder also answers to `lora_te_` (diffusers' `text_encoder.`), and the refiner's only encoder, bigG, is
`lora_te2_` as in diffusers' refiner pipeline.
"""
from dataclasses import dataclass

from torch import nn

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
KOHYA_UNET = "lora_unet_"
KOHYA_TEXT = "lora_te_"
KOHYA_TEXT1, KOHYA_TEXT2 = "lora_te1_", "lora_te2_"  # SDXL's text encoders, as kohya-ss names them
TEXT_NAMES = (KOHYA_TEXT, KOHYA_TEXT1, KOHYA_TEXT2)
# diffusers/PEFT module prefixes -> the canonical ones
DIFFUSERS_PREFIXES = (("unet.", KOHYA_UNET), ("text_encoder.", KOHYA_TEXT), ("text_encoder_2.", KOHYA_TEXT2))
# diffusers' ResnetBlock2D names -> our ResBlock's
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# transformers' CLIPEncoderLayer names -> OpenCLIP's ResidualAttentionBlock's (q/k/v are fused rows)
OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
QKV = ("q_proj", "k_proj", "v_proj")
LAYER_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """A weight of ours that a LoRA layer changes: the module, and for a fused weight the rows it owns."""
    module: str  # full path in the LatentDiffusion model
    parameter: str = "weight"
    rows: tuple[int, int] | None = None  # [begin, end) of the weight's rows

    @property
    def parameter_name(self) -> str:
        return f"{self.module}.{self.parameter}"


def canonical_name(layer: str) -> str | None:
    """`lora_unet_...`/`lora_te_...` for a kohya or diffusers/PEFT layer name; None for another part."""
    for dotted, kohya in DIFFUSERS_PREFIXES:
        if layer.startswith(dotted):
            # diffusers' older attention-processor spelling: attn1.processor.to_q_lora -> attn1.to_q
            path = layer[len(dotted):].replace(".processor.", ".").replace("to_out_lora", "to_out.0")
            path = path.removesuffix("_lora").removesuffix(".lora_linear_layer")
            return kohya + path.replace(".", "_")
    if layer.startswith((KOHYA_UNET, *TEXT_NAMES)):
        return layer
    return None


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """{canonical LoRA layer name: our target} for every linear and convolution layer of the UNet and the
    text encoder of `model` (a LatentDiffusion)."""
    table = {}
    unet = model.model.diffusion_model
    for diffusers_path, ours in unet_paths(unet).items():
        table[KOHYA_UNET + diffusers_path.replace(".", "_")] = Target(UNET_PREFIX + ours)
    table.update(own_names(unet, KOHYA_UNET, UNET_PREFIX))
    encoder = model.cond_stage_model
    for names, prefix, text_encoder in text_encoder_names(encoder):
        for kohya in names:
            table.update({kohya + path.replace(".", "_"): target
                          for path, target in text_targets(text_encoder, prefix).items()})
    table.update(own_names(encoder, KOHYA_TEXT, TEXT_PREFIX))
    return table


def text_encoder_names(encoder: nn.Module) -> list[tuple[tuple[str, ...], str, nn.Module]]:
    """(the kohya prefixes of each text encoder, its module path, the encoder): SD's one, or SDXL's."""
    from ldm.modules.encoders.sdxl_conditioner import FrozenOpenCLIPEmbedder2, SDXLConditioner

    if not isinstance(encoder, SDXLConditioner):
        return [((KOHYA_TEXT,), TEXT_PREFIX, encoder)]
    found = []
    for index, (embedder, key) in enumerate(zip(encoder.embedders, encoder.input_keys)):
        if key == "txt":
            names = (KOHYA_TEXT2,) if isinstance(embedder, FrozenOpenCLIPEmbedder2) else (KOHYA_TEXT1, KOHYA_TEXT)
            found.append((names, f"{TEXT_PREFIX}embedders.{index}.", embedder))
    return found


def own_names(component: nn.Module, kohya_prefix: str, our_prefix: str) -> dict[str, Target]:
    return {kohya_prefix + path.replace(".", "_"): Target(our_prefix + path)
            for path, module in component.named_modules() if isinstance(module, LAYER_TYPES)}


def unet_paths(unet: nn.Module) -> dict[str, str]:
    """{diffusers UNet2DConditionModel layer path: ours under diffusion_model} for every linear/conv."""
    paths = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if isinstance(getattr(unet, "label_emb", None), nn.Sequential):  # SDXL's vector condition (diffusers' text_time)
        paths.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    blocks = {}  # diffusers block path -> (our block path, kind)
    level, in_level = 0, 0
    for index, block in list(enumerate(unet.input_blocks))[1:]:
        if is_sampler(block[0]):
            blocks[f"down_blocks.{level}.downsamplers.0"] = (f"input_blocks.{index}.0", "sampler")
            level, in_level = level + 1, 0
            continue
        blocks.update(resnet_and_attention(block, f"down_blocks.{level}", in_level, f"input_blocks.{index}"))
        in_level += 1
    blocks["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    blocks["mid_block.attentions.0"] = ("middle_block.1", "attention")
    blocks["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    level, in_level = 0, 0
    for index, block in enumerate(unet.output_blocks):
        blocks.update(resnet_and_attention(block, f"up_blocks.{level}", in_level, f"output_blocks.{index}"))
        in_level += 1
        if is_sampler(block[-1]):
            blocks[f"up_blocks.{level}.upsamplers.0"] = (f"output_blocks.{index}.{len(block) - 1}", "sampler")
        if is_sampler(block[-1]) or index == len(unet.output_blocks) - 1:
            level, in_level = level + 1, 0
    for diffusers_block, (our_block, kind) in blocks.items():
        for path, module in unet.get_submodule(our_block).named_modules():
            if isinstance(module, LAYER_TYPES):
                paths[f"{diffusers_block}.{diffusers_part(path, kind)}"] = f"{our_block}.{path}"
    return paths


def is_sampler(module: nn.Module) -> bool:
    return type(module).__name__ in ("Downsample", "Upsample")


def resnet_and_attention(block: nn.Module, diffusers_block: str, in_level: int, our_block: str) -> dict:
    found = {f"{diffusers_block}.resnets.{in_level}": (f"{our_block}.0", "resnet")}
    if len(block) > 1 and type(block[1]).__name__ == "SpatialTransformer":
        found[f"{diffusers_block}.attentions.{in_level}"] = (f"{our_block}.1", "attention")
    return found


def diffusers_part(our_path: str, kind: str) -> str:
    if kind == "resnet":
        return {ours: theirs for theirs, ours in RESNET_PARTS.items()}[our_path]
    if kind == "sampler":
        return "conv"  # ours: Downsample.op / Upsample.conv
    return our_path  # a SpatialTransformer's parts have the same names in both


def text_targets(encoder: nn.Module, prefix: str = TEXT_PREFIX) -> dict[str, Target]:
    """{transformers CLIPTextModel layer path: our target} for the encoder layers' linear layers; prefix:
    the encoder's path in the model."""
    if hasattr(encoder, "transformer") and hasattr(encoder.transformer, "text_model"):  # SD 1.x, HF layout
        return {path: Target(prefix + "transformer." + path)
                for path, module in encoder.transformer.named_modules() if isinstance(module, nn.Linear)}
    # OpenCLIP's tower (SD 2.x) or our shapes model's (the same residual blocks, without the "model." level)
    owner, path = (encoder.model, "model.") if hasattr(encoder, "model") else (encoder, "")
    if not hasattr(getattr(owner, "transformer", None), "resblocks"):
        return {}
    targets = {}
    for index, block in enumerate(owner.transformer.resblocks):
        ours = f"{prefix}{path}transformer.resblocks.{index}."
        theirs = f"text_model.encoder.layers.{index}."
        width = block.attn.out_proj.in_features
        for part, name in enumerate(QKV):
            targets[f"{theirs}self_attn.{name}"] = Target(ours + "attn", "in_proj_weight",
                                                          (part * width, (part + 1) * width))
        for their_part, our_part in OPEN_CLIP_PARTS.items():
            if isinstance(block.get_submodule(our_part), nn.Linear):
                targets[theirs + their_part] = Target(ours + our_part)
    return targets
