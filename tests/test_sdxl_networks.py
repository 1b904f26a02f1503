"""LoRA and textual-inversion embeddings on SDXL: kohya's lora_unet_/lora_te1_/lora_te2_ names and diffusers/PEFT
files (unet., text_encoder_2.) merged where they belong, checked against diffusers' UNet and transformers'
OpenCLIP text model with the same PEFT LoRA; SDXL embeddings ({clip_l, clip_g}) each to its own encoder.
Tiny SDXL (configs/tiny/sdxl-tiny.yaml: its first encoder is a tiny BPE transformer, its second OpenCLIP)."""
import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from helpers import diffusers_openclip_with_projection, diffusers_sdxl_unet, loaded_in_memory, seeded
from ldm.generate.conditioning import Conditioner, resolve
from ldm.modules.embeddings import EmbeddingDatabase, EmbeddingSkipped, load_embeddings, read_embedding
from ldm.modules.lora import LoraPatcher, read_lora
from tiny_model import tiny_model

TINY_SDXL = REPO / "configs" / "tiny" / "sdxl-tiny.yaml"
TE1_WIDTH, TE1_TOKEN, TE2_WIDTH, TE2_LAYERS, TE2_HEADS = 32, 8, 16, 2, 2  # the tiny config's encoders


@pytest.fixture
def model():
    return tiny_model(seed=5, config=TINY_SDXL)


def parameter(model, name):
    return dict(model.named_parameters())[name]


# --- LoRA ------------------------------------------------------------------------------------------------------
def kohya_layer(out_features, in_features, rank=2, alpha=4.0, seed=0):
    generator = seeded(seed)
    return {"lora_down.weight": torch.randn(rank, in_features, generator=generator),
            "lora_up.weight": torch.randn(out_features, rank, generator=generator), "alpha": torch.tensor(alpha)}


def test_kohya_sdxl_names_reach_both_encoders_and_the_original_layout_unet(model, tmp_path):
    layers = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": (
            "cond_stage_model.embedders.0.transformer.resblocks.0.mlp.c_fc.weight", None, 4 * TE1_WIDTH, TE1_WIDTH),
        "lora_te2_text_model_encoder_layers_1_self_attn_k_proj": (
            "cond_stage_model.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            (TE2_WIDTH, 2 * TE2_WIDTH), TE2_WIDTH, TE2_WIDTH),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k": (  # kohya's SDXL: the original layout
            "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", None, 64, 48),
        "lora_unet_down_blocks_1_attentions_0_proj_in": (  # converted from diffusers: diffusers' names
            "model.diffusion_model.input_blocks.3.1.proj_in.weight", None, 64, 64),
    }
    tensors = {f"{name}.{part}": tensor for index, (name, (_, _, out, inp)) in enumerate(layers.items())
               for part, tensor in kohya_layer(out, inp, seed=index).items()}
    save_file(tensors, tmp_path / "xl.safetensors")
    lora = read_lora(tmp_path / "xl.safetensors")
    assert lora.family == "SDXL"
    before = {target: parameter(model, target).detach().clone() for target, *_ in layers.values()}
    result = LoraPatcher(model, log=lambda line: None).apply([(lora, 0.5, 0.75)])
    assert result.merged == {"xl": 4} and result.unmatched == {"xl": []}
    for name, (target, rows, _, _) in layers.items():
        weight = 0.75 if name.startswith("lora_te") else 0.5
        delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"] * (4.0 / 2) * weight
        changed = parameter(model, target).detach() - before[target]
        if rows is not None:
            assert not changed[:rows[0]].any() and not changed[rows[1]:].any()
            changed = changed[rows[0]:rows[1]]
        torch.testing.assert_close(changed.reshape(delta.shape), delta, rtol=1e-5, atol=1e-6)


def peft_lora(module, targets, seed):
    """`module` with a PEFT LoRA of random up and down weights on `targets`: (the module, its LoRA state dict)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    module = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=targets),
                                     module)
    return module, get_peft_model_state_dict(module)


def merged_state_dict(module) -> dict:
    """`module`'s weights with its PEFT LoRA merged in (PEFT's own merge), under the names it had before."""
    for layer in module.modules():
        if hasattr(layer, "merge") and hasattr(layer, "base_layer"):
            layer.merge()
    return {key.replace(".base_layer.", "."): tensor for key, tensor in module.state_dict().items()
            if ".lora_" not in key}


def test_a_diffusers_peft_lora_merges_into_our_unet_and_bigg_as_peft_merges_it(model, tmp_path):
    """diffusers' save_lora_weights of PEFT LoRAs on diffusers' UNet and transformers' OpenCLIP text model (converted
    from our weights by diffusers), merged by us and by PEFT: the same weights, mapped back to ours by the inverse
    of diffusers' conversion."""
    from diffusers import StableDiffusionXLPipeline

    from ldm.diffusers_folder import openclip_to_original, unet_to_original

    original = {key: value.clone() for key, value in model.state_dict().items()}  # PEFT merges in place
    unet = diffusers_sdxl_unet(TINY_SDXL, {key: value.clone() for key, value in original.items()})
    unet, unet_lora = peft_lora(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                       "ff.net.2", "conv1", "conv2"], seed=1)
    copies = {key: value.clone() for key, value in original.items()}
    text_encoder_2 = diffusers_openclip_with_projection(copies, "conditioner.embedders.1.model.", TE2_WIDTH, TE2_LAYERS,
                                                        TE2_HEADS)
    text, text_lora = peft_lora(text_encoder_2, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], seed=2)
    metadata = {"r": 2, "lora_alpha": 4}  # a scale of 2: the file's metadata must be read
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_lora, text_encoder_2_lora_layers=text_lora,
                                                unet_lora_adapter_metadata=metadata,
                                                text_encoder_2_lora_adapter_metadata=metadata)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    result = LoraPatcher(model, log=lambda line: None).apply([(lora, 1.0, 1.0)])
    assert result.unmatched == {"pytorch_lora_weights": []}
    assert result.merged["pytorch_lora_weights"] == len(lora.layers) > 20

    ours = {key.replace("cond_stage_model.", "conditioner.", 1): value for key, value in model.state_dict().items()}
    theirs = unet_to_original(merged_state_dict(unet))
    theirs.update({key.replace("cond_stage_model.model.", "conditioner.embedders.1.model."): value for key, value
                   in openclip_to_original(merged_state_dict(text)).items() if "text_projection" not in key})
    changed = [key for key in theirs if not torch.equal(theirs[key], original[key])]
    assert len(changed) > 20
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


# --- embeddings -------------------------------------------------------------------------------------------------
def sdxl_embedding(path, vectors=2, widths=(TE1_TOKEN, TE2_WIDTH), seed=0):
    generator = seeded(seed)
    tensors = {key: torch.randn(vectors, width, generator=generator) for key, width in zip(("clip_l", "clip_g"), widths)}
    save_file(tensors, path)
    return tensors


def test_an_sdxl_embedding_gives_each_encoder_its_own_vectors(model, tmp_path):
    loaded = loaded_in_memory(model, TINY_SDXL)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    tensors = sdxl_embedding(folder / "xlstyle.safetensors")
    sdxl_embedding(folder / "too_wide.safetensors", widths=(768, 1280))
    save_file({"emb_params": torch.randn(2, TE1_TOKEN)}, folder / "sd1.safetensors")
    lines = []
    loaded.embeddings = load_embeddings(folder, model.cond_stage_model, log=lines.append)
    assert list(loaded.embeddings.embeddings) == ["xlstyle"]
    assert any("too_wide" in line and "skipped" in line for line in lines)
    assert any("sd1" in line and "SD 1.x/2.x" in line for line in lines)

    conditioner = Conditioner(loaded, lambda line: None, embeddings=loaded.embeddings)
    resolve(conditioner(["a xlstyle cat"], composable=True), 4)
    with_embedding = conditioner.cache[("a xlstyle cat",)]
    plain = Conditioner(loaded, lambda line: None)
    resolve(plain(["a xlstyle cat"], composable=True), 4)
    assert not torch.equal(with_embedding, plain.cache[("a xlstyle cat",)])
    assert list(loaded.embeddings.used) == ["xlstyle"]

    found = loaded.embeddings.lookup_for("clip_g")(loaded.embeddings.tokenizer.encode("xlstyle"), 0)
    assert torch.equal(found[0].vectors, tensors["clip_g"]) and found[1] == 2
    embedding = read_embedding(folder / "xlstyle.safetensors", {"clip_l": TE1_TOKEN, "clip_g": TE2_WIDTH})
    assert embedding.vectors.shape == (2, TE1_TOKEN + TE2_WIDTH) and torch.equal(embedding.per_encoder["clip_l"],
                                                                               tensors["clip_l"])


def test_sdxl_embedding_vectors_replace_the_tokens_in_each_encoder(model, tmp_path):
    """With the vectors of the embedding equal to the token embeddings of a word, the embedding's name encodes as
    that word in both encoders."""
    loaded = loaded_in_memory(model, TINY_SDXL)
    encoders = model.cond_stage_model.text_encoders
    word = encoders[0].tokenize(["dog"])[0, 1]  # the word's one token, after the start token
    vectors = {key: encoder.token_embedding_module().weight[word][None].detach().clone()
               for key, encoder in zip(("clip_l", "clip_g"), encoders)}
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file(vectors, folder / "xlstyle.safetensors")
    database = EmbeddingDatabase(folder, vector_size={"clip_l": TE1_TOKEN, "clip_g": TE2_WIDTH})
    with_embedding = Conditioner(loaded, lambda line: None, embeddings=database)
    plain = Conditioner(loaded, lambda line: None)
    cond = resolve(with_embedding(["a xlstyle"], composable=True), 4)
    reference = resolve(plain(["a dog"], composable=True), 4)
    torch.testing.assert_close(cond["c_crossattn"][0].at(0), reference["c_crossattn"][0].at(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["c_adm"].at(0), reference["c_adm"].at(0), rtol=0, atol=1e-6)


def test_sdxl_embedding_files_are_checked(tmp_path):
    save_file({"clip_l": torch.randn(2, TE1_TOKEN), "clip_g": torch.randn(3, TE2_WIDTH)}, tmp_path / "uneven.safetensors")
    from ldm.modules.embeddings import EmbeddingError

    with pytest.raises(EmbeddingError, match="2 clip_l vectors and 3 clip_g vectors"):
        read_embedding(tmp_path / "uneven.safetensors")
    save_file({"emb_params": torch.randn(2, TE1_TOKEN)}, tmp_path / "sd.safetensors")
    with pytest.raises(EmbeddingSkipped, match="SDXL model takes clip_l and clip_g"):
        read_embedding(tmp_path / "sd.safetensors", {"clip_g": TE2_WIDTH})
