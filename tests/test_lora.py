"""LoRA / LyCORIS files merged into our CompVis-named weights: names, numbers, exact restore, bad files.

The key maps are checked against diffusers' own module names (its UNet2DConditionModel and transformers'
CLIPTextModel built on the meta device from the original configs). The numbers are checked against
diffusers' `load_lora_weights`, which converts kohya files itself and runs the LoRA unmerged (PEFT
layers) on a UNet and text encoder holding the same random full-size weights as ours (converted to its
layout by diffusers' own conversion functions). No hub access.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from conftest import REPO, reference_path  # noqa: E402
from helpers import diffusers_models, random_state_dict, relative_error, seeded  # noqa: E402
from ldm.checkpoint import parameters_on_meta  # noqa: E402
from ldm.modules.diffusionmodules import util as diffusion_util  # noqa: E402
from ldm.modules.diffusionmodules.util import packed_kernels  # noqa: E402
from ldm.placement import place_weights  # noqa: E402
from ldm.modules.lora import LoraError, LoraLayer, LoraPatcher, read_lora, rebuild_tucker  # noqa: E402
from ldm.modules.lora_keys import KOHYA_TEXT, KOHYA_UNET, canonical_name, lora_targets, unet_paths  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from tiny_model import tiny_model  # noqa: E402

MAX_RELATIVE_ERROR = 1e-4
FAMILIES = {
    "sd1": ("v1-inference.yaml", "compvis-v1-inference.yaml", dict(hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")),
    "sd2": ("v2-inference.yaml", "stability-v2-inference.yaml", dict(hidden_size=1024, intermediate_size=4096,
            num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")),
}
LAYERS = (nn.Linear, nn.Conv2d)


def build_ours(config_name: str, weights: dict | None = None) -> nn.Module:
    config = OmegaConf.load(REPO / "configs" / "stable-diffusion" / config_name)
    with parameters_on_meta():
        model = instantiate_from_config(config.model, use_ema=False)
    if weights is not None:
        model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def diffusers_unet_on_meta(original_config: str, state_dict: dict) -> nn.Module:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = OmegaConf.to_container(OmegaConf.load(reference_path("original-configs", original_config)), resolve=True)
    with init_empty_weights():
        return UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, state_dict))


def clip_text_model(text_config: dict, state_dict: dict | None = None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **text_config))
    if state_dict is not None:
        if not hasattr(model, "text_model"):  # transformers >= 5.6 has no "text_model." level
            state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def text_model_path(name: str) -> str:
    """The module path as diffusers' LoRA names spell it (with the text_model. level in every version)."""
    return name if name.startswith("text_model.") else "text_model." + name


def kohya_layer_shapes(unet: nn.Module, text: nn.Module) -> dict:
    """{kohya name: weight shape} of every linear and convolution of diffusers' UNet and CLIP text model."""
    def shapes(prefix, module, path=lambda name: name):
        return {prefix + path(name).replace(".", "_"): tuple(layer.weight.shape)
                for name, layer in module.named_modules() if isinstance(layer, LAYERS)}
    return {**shapes(KOHYA_UNET, unet), **shapes(KOHYA_TEXT, text, text_model_path)}


# --- names ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_diffusers_layer_maps_onto_ours_with_its_shape(family):
    config_name, original_config, text_config = FAMILIES[family]
    ours = build_ours(config_name)
    table, parameters = lora_targets(ours), dict(ours.named_parameters())
    unet = diffusers_unet_on_meta(original_config, ours.state_dict())
    text = clip_text_model(text_config)
    expected = kohya_layer_shapes(unet, text)
    assert len(expected) > 300
    missing = sorted(set(expected) - set(table))
    assert not missing, missing[:5]
    for name, shape in expected.items():
        target = table[name]
        weight = parameters[target.parameter_name]
        if target.rows is not None:  # a third of OpenCLIP's fused q/k/v projection
            assert weight.shape[0] == 3 * shape[0]
            weight = weight[target.rows[0]:target.rows[1]]
        assert tuple(weight.shape) == shape, (name, target)
    distinct = {(table[name].parameter_name, table[name].rows) for name in expected}
    assert len(distinct) == len(expected)  # no two diffusers layers land on the same weight


def test_peft_and_our_own_names_reach_the_same_targets():
    table = lora_targets(build_ours("v1-inference.yaml"))
    assert canonical_name("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert canonical_name("unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor.to_out_lora") == \
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0"
    assert table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"].module == \
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_out.0"
    assert table["lora_unet_up_blocks_0_upsamplers_0_conv"].module == "model.diffusion_model.output_blocks.2.1.conv"
    assert table["lora_unet_up_blocks_1_upsamplers_0_conv"].module == "model.diffusion_model.output_blocks.5.2.conv"
    assert table["lora_unet_input_blocks_4_1_proj_in"] == table["lora_unet_down_blocks_1_attentions_0_proj_in"]
    assert table["lora_te_text_model_encoder_layers_11_mlp_fc2"].module == \
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2"
    sd2 = lora_targets(build_ours("v2-inference.yaml"))
    v = sd2["lora_te_text_model_encoder_layers_3_self_attn_v_proj"]
    assert (v.parameter_name, v.rows) == ("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", (2048, 3072))


# --- random LoRA files ----------------------------------------------------------------------------------------
def kohya_lora(shapes: dict, seed: int, rank: int = 4, alpha: float = 2.0) -> dict:
    """A kohya LoCon file's tensors for layers {kohya name: weight shape}: convolutions with the kernel on
    lora_down and a 1x1 lora_up. One alpha for all layers, as kohya writes them (diffusers 0.42 drops
    per-layer alphas that differ: PEFT's alpha_pattern gets keys that match no module)."""
    generator, tensors = seeded(seed), {}
    for name, shape in shapes.items():
        out_features, in_features, *kernel = shape
        fan_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, *kernel, generator=generator) / fan_in ** 0.5
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, *[1] * len(kernel), generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


@pytest.mark.slow
def test_kohya_locon_matches_diffusers_load_lora_weights(tmp_path):
    """SD 1.x, full size: a rank-4 LoCon on every layer of the UNet and text encoder, through diffusers'
    own kohya conversion and PEFT layers, gives the same UNet and text encoder outputs as our merge."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    from ldm.modules.encoders.tokenizer import SD1_PAD_TOKEN, tokenize

    config_name, original_config, text_config = FAMILIES["sd1"]
    weights = random_state_dict(build_ours(config_name).state_dict(), seed=0)
    ours = build_ours(config_name, weights)
    unet, _vae = diffusers_models(reference_path("original-configs", original_config), weights)
    text = clip_text_model(text_config, convert_ldm_clip_checkpoint(weights))

    shapes = kohya_layer_shapes(unet, text)
    lora_path = tmp_path / "locon.safetensors"
    save_file(kohya_lora(shapes, seed=1), lora_path)

    class Pipeline(StableDiffusionLoraLoaderMixin):  # what the loader reads of a DiffusionPipeline
        hf_device_map = None

        def __init__(self):
            self.unet, self.text_encoder = unet, text
            self.components = {"unet": unet, "text_encoder": text}

    Pipeline().load_lora_weights(str(lora_path))
    prompts = ["a photograph of an astronaut riding a horse", "(masterpiece), a cat"]
    x, t = torch.randn(1, 4, 8, 8, generator=seeded(2)), torch.tensor([700])
    context = torch.randn(1, 77, 768, generator=seeded(3))
    with torch.no_grad():
        expected_unet = unet(x, t, encoder_hidden_states=context).sample
        expected_text = text(input_ids=tokenize(prompts, SD1_PAD_TOKEN)[0]).last_hidden_state
        base_unet, base_text = ours.apply_model(x, t, context), ours.cond_stage_model(prompts)

        patcher = LoraPatcher(ours, log=pytest.fail)  # every key must be used: nothing to report
        result = patcher.apply([(read_lora(lora_path), 1.0, 1.0)])
        assert result.merged == {"locon": len(shapes)} and result.report() is None
        unet_error = relative_error(ours.apply_model(x, t, context), expected_unet)
        text_error = relative_error(ours.cond_stage_model(prompts), expected_text)
        assert unet_error < MAX_RELATIVE_ERROR and text_error < MAX_RELATIVE_ERROR, (unet_error, text_error)
        # The LoRA changes the outputs far beyond the tolerance, so the agreement means something.
        assert relative_error(base_unet, expected_unet) > 100 * MAX_RELATIVE_ERROR
        assert relative_error(base_text, expected_text) > 100 * MAX_RELATIVE_ERROR

        patcher.restore()
        assert all(parameter.data_ptr() == weights[name].data_ptr() and torch.equal(parameter, weights[name])
                   for name, parameter in ours.named_parameters())


# --- the delta formulas, against their definitions --------------------------------------------------------------
def conv_chain(x, *kernels):
    for kernel in kernels:
        x = nn.functional.conv2d(x, kernel, padding=kernel.shape[-1] // 2)
    return x


def test_locon_and_its_tucker_core_equal_the_convolutions_they_stand_for():
    """LoCon runs lora_down (k x k) then lora_up (1 x 1); with LyCORIS's Tucker core, 1 x 1 down, k x k mid,
    1 x 1 up. The merged kernel must give the same output as that chain of convolutions."""
    g = seeded(0)
    x = torch.randn(1, 5, 6, 6, generator=g, dtype=torch.float64)
    down, up = torch.randn(3, 5, 3, 3, generator=g), torch.randn(7, 3, 1, 1, generator=g)
    layer = LoraLayer("lora_unet_x", {"lora_down.weight": down, "lora_up.weight": up})
    close = dict(rtol=1e-5, atol=1e-5)  # the delta is computed in fp32
    torch.testing.assert_close(conv_chain(x, layer.delta().double()), conv_chain(x, down.double(), up.double()), **close)
    down, mid = torch.randn(3, 5, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g)
    layer.parts.update({"lora_down.weight": down, "lora_mid.weight": mid})
    torch.testing.assert_close(conv_chain(x, layer.delta().double()),
                               conv_chain(x, down.double(), mid.double(), up.double()), **close)


def test_loha_is_the_elementwise_product_of_two_low_rank_matrices():
    g = seeded(1)
    w1a, w1b, w2a, w2b = (torch.randn(shape, generator=g) for shape in ((6, 2), (2, 4), (6, 3), (3, 4)))
    delta = LoraLayer("lora_unet_x", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}).delta()
    for i in range(6):
        for j in range(4):
            expected = sum(w1a[i, r] * w1b[r, j] for r in range(2)) * sum(w2a[i, r] * w2b[r, j] for r in range(3))
            assert abs(delta[i, j] - expected) < 1e-5


def test_loha_tucker_factors_are_rebuilt_like_a_tucker_kernel():
    """hada_t1 holds the core, hada_w1_a the output factor (transposed, [rank, out]) and hada_w1_b the input
    one, as LyCORIS writes them; each half is then a Tucker kernel."""
    g = seeded(2)
    t1, t2 = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    a1, b1, a2, b2 = (torch.randn(2, n, generator=g) for n in (7, 5, 7, 5))
    layer = LoraLayer("lora_unet_x", {"hada_w1_a": a1, "hada_w1_b": b1, "hada_t1": t1,
                                      "hada_w2_a": a2, "hada_w2_b": b2, "hada_t2": t2})
    expected = rebuild_tucker(t1, a1.T, b1) * rebuild_tucker(t2, a2.T, b2)
    torch.testing.assert_close(layer.delta(), expected)
    assert layer.delta().shape == (7, 5, 3, 3)


def test_lokr_is_the_kronecker_product():
    g = seeded(3)
    w1, w2a, w2b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    layer = LoraLayer("lora_unet_x", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    delta, w2 = layer.delta(), w2a @ w2b
    for i1, i2, j1, j2 in [(0, 0, 0, 0), (1, 3, 2, 4), (1, 2, 0, 3), (0, 1, 2, 0)]:
        assert abs(delta[i1 * 4 + i2, j1 * 5 + j2] - w1[i1, j1] * w2[i2, j2]) < 1e-5
    assert layer.scale(None) == 1 / 2  # alpha over the rank of the decomposed factor


# --- merging and restoring on the tiny model ----------------------------------------------------------------------
def target_shape(model, name) -> tuple:
    target = lora_targets(model)[name]
    shape = tuple(dict(model.named_parameters())[target.parameter_name].shape)
    return shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:])


def tiny_lora(model, names, seed, rank=2, alpha=1.0) -> dict:
    return kohya_lora({name: target_shape(model, name) for name in names}, seed, rank, alpha)


def tiny_names(model) -> list:
    """A conv, a resnet's conv, attention projections and a text-encoder layer of the tiny model."""
    table = lora_targets(model)
    names = ["lora_unet_conv_in", "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_mid_block_attentions_0_proj_in"]
    names += [name for name in table if name.endswith("attn2_to_k")][:2]
    names += ["lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert all(name in table for name in names)
    return names


def snapshot(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_bit_identical(model, before: dict):
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype for name, tensor in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_adds_the_scaled_delta_and_restore_is_bit_exact(tmp_path, dtype):
    model = tiny_model().to(dtype)
    before, names = snapshot(model), tiny_names(model)
    save_file(tiny_lora(model, names, seed=4, alpha=1.0), tmp_path / "a.safetensors")
    lora = read_lora(tmp_path / "a.safetensors")
    patcher = LoraPatcher(model, log=pytest.fail)
    assert patcher.apply([(lora, 0.7, 0.3)]).merged == {"a": len(names)}
    parameters = dict(model.named_parameters())
    for name in names:
        target, layer = patcher.targets[name], lora.layers[name]
        weight = 0.3 if name.startswith(KOHYA_TEXT) else 0.7
        rows = slice(*target.rows) if target.rows else slice(None)
        delta = layer.delta().reshape(target_shape(model, name)) * (0.5 * weight)
        expected = before[target.parameter_name][rows].float() + delta
        assert torch.equal(parameters[target.parameter_name][rows], expected.to(dtype))  # fp32 math, one cast
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed == {patcher.targets[name].parameter_name for name in names}
    patcher.restore()
    assert_bit_identical(model, before)


def test_a_different_set_restores_first_and_the_same_set_changes_nothing(tmp_path):
    model = tiny_model()
    before, names = snapshot(model), tiny_names(model)
    for stem, seed in (("a", 5), ("b", 6)):
        save_file(tiny_lora(model, names, seed), tmp_path / f"{stem}.safetensors")
    a, b = read_lora(tmp_path / "a.safetensors"), read_lora(tmp_path / "b.safetensors")
    patcher = LoraPatcher(model, log=pytest.fail)
    patcher.apply([(a, 1.0, 1.0), (b, 0.5, 0.5)])
    both = snapshot(model)
    patcher.apply([(a, 1.0, 1.0), (b, 0.5, 0.5)])
    assert_bit_identical(model, both)
    patcher.apply([(b, 0.5, 0.5)])
    only_b = snapshot(model)
    fresh = tiny_model()
    LoraPatcher(fresh, log=pytest.fail).apply([(b, 0.5, 0.5)])
    assert_bit_identical(fresh, only_b)
    patcher.apply([])
    assert_bit_identical(model, before)


def test_outputs_follow_each_merged_set_through_the_prepacked_kernels(tmp_path, monkeypatch):
    """The UNet keeps kernels prepacked between calls (ldm.modules.diffusionmodules.util): every merge and
    restore drops them, as a merged copy may take the address of the one freed before it."""
    model = tiny_model().to(memory_format=torch.channels_last)  # as loaded: the kernels are packed only so
    names = tiny_names(model)
    for stem, seed in (("a", 8), ("b", 9)):
        save_file(tiny_lora(model, names, seed), tmp_path / f"{stem}.safetensors")
    a, b = read_lora(tmp_path / "a.safetensors"), read_lora(tmp_path / "b.safetensors")
    x, context = torch.randn(2, 4, 8, 8, generator=seeded(10)), torch.randn(2, 77, 32, generator=seeded(11))

    def output(of):
        with torch.inference_mode():
            return of.model.diffusion_model(x, torch.tensor([10, 900]), context)

    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
    patcher = LoraPatcher(model, log=pytest.fail)
    output(model), output(model)  # packed from the second call with a shape
    assert packed_kernels(model)
    for selection in ([(a, 1.0, 1.0)], [(b, 1.0, 1.0)], [(a, 1.0, 1.0)], []):
        patcher.apply(selection)
        assert not packed_kernels(model)
        fresh = tiny_model().to(memory_format=torch.channels_last)
        LoraPatcher(fresh, log=pytest.fail).apply(selection)
        expected = output(fresh)
        assert torch.equal(output(model), expected) and torch.equal(output(model), expected)
        assert packed_kernels(model)


def test_lowmem_component_gets_the_selected_set_when_converted(tmp_path):
    """select() leaves the weights alone; apply_to_component merges into a converted copy once."""
    model = tiny_model()
    names = tiny_names(model)
    save_file(tiny_lora(model, names, seed=7), tmp_path / "a.safetensors")
    lora = read_lora(tmp_path / "a.safetensors")
    merged_model = tiny_model()
    LoraPatcher(merged_model, log=pytest.fail).apply([(lora, 1.0, 1.0)])
    before = snapshot(model)
    patcher = LoraPatcher(model, log=pytest.fail)
    patcher.select([(lora, 1.0, 1.0)])
    assert_bit_identical(model, before)
    for component in ("cond_stage_model", "model"):
        # What OneComponentAtATime.use does: new parameters, copies that are the run's own.
        place_weights(model, "cpu", torch.float32, channels_last=True, children=[component])
        converted = getattr(model, component)
        patcher.apply_to_component(component, converted)
        patcher.apply_to_component(component, converted)  # twice: still merged once
    assert_bit_identical(model, merged_model.state_dict())


def test_peft_file_with_alpha_in_metadata_equals_the_kohya_file(tmp_path):
    model = tiny_model()
    paths = [path for path in unet_paths(model.model.diffusion_model) if path.endswith(("attn2.to_k", "attn1.to_out.0"))]
    names = [KOHYA_UNET + path.replace(".", "_") for path in paths]
    kohya = tiny_lora(model, names, seed=8, rank=2, alpha=1.0)
    peft = {}
    for path, name in zip(paths, names):
        peft[f"unet.{path}.lora_A.weight"] = kohya[f"{name}.lora_down.weight"]
        peft[f"unet.{path}.lora_B.weight"] = kohya[f"{name}.lora_up.weight"]
    save_file(kohya, tmp_path / "kohya.safetensors")
    metadata = {"lora_adapter_metadata": '{"unet.lora_alpha": 1.0, "unet.r": 2}'}  # as diffusers writes it
    save_file(peft, tmp_path / "peft.safetensors", metadata=metadata)
    merged = []
    for stem in ("kohya", "peft"):
        fresh = tiny_model()
        lora = read_lora(tmp_path / f"{stem}.safetensors")
        assert LoraPatcher(fresh, log=pytest.fail).apply([(lora, 1.0, 1.0)]).merged == {stem: len(names)}
        merged.append(snapshot(fresh))
    assert len(names) >= 4 and all(torch.equal(merged[0][key], merged[1][key]) for key in merged[0])
    assert not all(torch.equal(merged[0][key], tensor) for key, tensor in tiny_model().state_dict().items())


def test_keys_that_match_nothing_are_reported_in_one_line_with_a_count(tmp_path):
    model = tiny_model()
    names = tiny_names(model)[:2]
    tensors = tiny_lora(model, names, seed=9)
    unknown = {"lora_unet_down_blocks_9_attentions_0_proj_in": (4, 4), "lora_te_nothing_here": (4, 4)}
    tensors.update(kohya_lora(unknown, seed=10))
    tensors["bundle_emb.foo.string_to_param.*"] = torch.zeros(1, 4)
    save_file(tensors, tmp_path / "extra.safetensors")
    messages = []
    result = LoraPatcher(model, log=messages.append).apply([(read_lora(tmp_path / "extra.safetensors"), 1.0, 1.0)])
    assert result.merged == {"extra": 2} and len(result.unmatched["extra"]) == 3
    assert len(messages) == 1 and "\n" not in messages[0] and "extra: 3 (" in messages[0]


# --- bad files -----------------------------------------------------------------------------------------------------
class RunsCode:
    def __reduce__(self):
        return (print, ("this must not run",))


def bad_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":
        save_file(kohya_lora({"lora_unet_conv_in": (32, 4, 3, 3)}, seed=11), path)
        path.write_bytes(path.read_bytes()[:-20])
    elif kind == "pickled code":
        path = path.with_suffix(".pt")
        torch.save({"lora_unet_conv_in.alpha": RunsCode()}, path)
    elif kind == "not a lora":
        save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, path)
    elif kind == "factors that do not fit":
        save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 8),
                   "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 3)}, path)
    elif kind == "missing":
        path = tmp_path / "missing.safetensors"
    return path


@pytest.mark.parametrize("kind", ["truncated", "pickled code", "not a lora", "factors that do not fit", "missing"])
def test_bad_files_are_refused_with_one_line_naming_the_file(tmp_path, kind, capsys):
    path = bad_file(tmp_path, kind)
    with pytest.raises(LoraError) as error:
        read_lora(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "this must not run" not in capsys.readouterr().out


def test_a_lora_for_another_family_is_refused_naming_it(tmp_path):
    """An SD 2.x LoRA (1024-wide text encoder and cross-attention) on an SD 1.x model."""
    shapes = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 1024)}
    save_file(kohya_lora(shapes, seed=12), tmp_path / "sd2.safetensors")
    lora = read_lora(tmp_path / "sd2.safetensors")
    assert lora.family == "SD 2.x"
    model = build_ours("v1-inference.yaml")
    with pytest.raises(LoraError, match="SD 2.x") as error:
        LoraPatcher(model, log=pytest.fail).apply([(lora, 1.0, 1.0)])
    assert "\n" not in str(error.value) and str(tmp_path / "sd2.safetensors") in str(error.value)


def test_clip_q_k_v_layers_change_only_their_rows_of_the_fused_projection(tmp_path):
    """SD 2.x's OpenCLIP (and our shapes model, the same blocks) fuse q, k, v into in_proj_weight."""
    model = tiny_model()
    names = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_self_attn_v_proj"]
    table = lora_targets(model)
    fused = table[names[0]].parameter_name
    assert fused == "cond_stage_model.transformer.resblocks.0.attn.in_proj_weight" == table[names[1]].parameter_name
    width = model.cond_stage_model.transformer.resblocks[0].attn.out_proj.in_features
    save_file(kohya_lora({name: (width, width) for name in names}, seed=13, rank=2, alpha=1.0), tmp_path / "qv.safetensors")
    lora = read_lora(tmp_path / "qv.safetensors")
    before = snapshot(model)[fused]
    LoraPatcher(model, log=pytest.fail).apply([(lora, 1.0, 1.0)])
    after = dict(model.named_parameters())[fused]
    q_delta, v_delta = (lora.layers[name].delta() * 0.5 for name in names)
    assert torch.equal(after[:width], before[:width] + q_delta)
    assert torch.equal(after[width:2 * width], before[width:2 * width])
    assert torch.equal(after[2 * width:], before[2 * width:] + v_delta)
