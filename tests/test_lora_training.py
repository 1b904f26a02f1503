"""LoRA and textual-inversion training (ldm.lora_training, scripts/train.py --lora_rank/--embedding): the files
read back with the project's own readers and give the model that was trained; no base weight changes."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ldm.data.shapes import ShapesDataset
from ldm.lora_training import (AdapterTraining, TrainedEmbedding, add_lora, encode_with_embedding, export_embedding,
                               export_lora, initial_vectors, remove_lora, trained_layers)
from ldm.modules.embeddings import load_embeddings
from ldm.modules.lora import LoraPatcher, read_lora
from ldm.training import collate_without_attrs
from tiny_model import tiny_model, write_tiny_checkpoint

PROMPTS = ["a small lilac circle on the left on a blue background", "a large red square at the top, lilac background"]


def shapes_batch(count=4, **variant):
    dataset = ShapesDataset(size=count, seed=3, **variant)
    return collate_without_attrs([dataset[index] for index in range(count)])


def train_steps(adapter, steps=3, lr=1e-2, **variant):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = adapter.training_loss(shapes_batch(**variant))
        loss.backward()
        optimizer.step()


def snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def outputs(model):
    """The UNet's prediction and the text encoder's output for fixed inputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        context = model.get_learned_conditioning(PROMPTS)
        x = torch.randn(2, model.channels, model.image_size, model.image_size)
        return context, model.apply_model(x, torch.tensor([10, 500]), context)


@pytest.mark.parametrize("targets", ["both", "unet", "text"])
def test_exported_lora_merges_into_exactly_the_trained_layers_and_gives_the_trained_model(tmp_path, targets):
    model = tiny_model()
    base = snapshot(model)
    layers = trained_layers(model, targets, convolutions=targets == "both")
    factors = add_lora(model, layers, rank=2, alpha=1.0)
    trained = [p for layer in factors for p in (layer.down, layer.up)]
    train_steps(AdapterTraining(model, trained, model.get_learned_conditioning), drawn_as={"circle": "square"})
    assert all(layer.up.abs().sum() > 0 for layer in factors)  # every layer was trained
    model.eval()
    trained_outputs = outputs(model)
    path = export_lora(factors, tmp_path / "circle-as-square.safetensors", targets, steps=3)

    remove_lora(model)
    after = snapshot(model)
    assert after.keys() == base.keys() and all(torch.equal(after[name], base[name]) for name in base)

    lora = read_lora(path)
    assert set(lora.layers) == set(layers) and not lora.not_understood
    assert all(float(layer.parts["alpha"]) == 1.0 for layer in lora.layers.values())
    result = LoraPatcher(model).apply([(lora, 1.0, 1.0)])
    assert result.merged == {"circle-as-square": len(layers)} and result.report() is None
    merged = snapshot(model)
    changed = {name for name in base if not torch.equal(merged[name], base[name])}
    assert changed == {target.parameter_name for target in layers.values()}
    for ours, theirs in zip(outputs(model), trained_outputs):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_lora_layers_are_the_attention_projections_unless_convolutions_are_asked_for():
    model = tiny_model()
    unet_layers = trained_layers(model, "unet")
    assert unet_layers and all(".attentions." in name or "_attentions_" in name for name in unet_layers)
    assert any(name.endswith("_attn2_to_k") for name in unet_layers)
    with_convolutions = trained_layers(model, "unet", convolutions=True)
    assert any(name.endswith("_resnets_0_conv1") for name in with_convolutions)
    text_layers = trained_layers(model, "text")
    assert any(name.endswith("_self_attn_q_proj") for name in text_layers)
    assert all(name.startswith("lora_te_") for name in text_layers)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_trained_embedding_reads_back_and_encodes_prompts_as_in_training(tmp_path, suffix):
    model = tiny_model()
    base = snapshot(model)
    encoder = model.cond_stage_model
    vectors = torch.nn.Parameter(initial_vectors(encoder, "red", 2))
    start = vectors.detach().clone()
    embedding = TrainedEmbedding("lilac", vectors)
    adapter = AdapterTraining(model, [vectors], lambda texts: encode_with_embedding(encoder, list(texts), embedding))
    train_steps(adapter, caption_words={"purple": "lilac"}, require={"color": "purple"})
    assert not torch.equal(vectors.detach(), start)
    assert all(torch.equal(tensor, base[name]) for name, tensor in model.state_dict().items())

    export_embedding(embedding.embedding, tmp_path / f"lilac{suffix}", steps=3)
    database = load_embeddings(tmp_path, encoder, log=lambda line: None)
    assert list(database.embeddings) == ["lilac"]
    assert torch.equal(database.embeddings["lilac"].vectors, vectors.detach())
    with torch.no_grad():
        trained = encode_with_embedding(encoder, PROMPTS, embedding)
        read_back = encode_with_embedding(encoder, PROMPTS, database)
    torch.testing.assert_close(read_back, trained, atol=0, rtol=0)
    assert not torch.equal(trained, encoder(PROMPTS))  # the name's tokens were replaced


def run_train(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_train_script_writes_a_lora_for_the_checkpoint(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "model")
    export = tmp_path / "out" / "tiny-lora.safetensors"
    run = run_train("--base", str(REPO / "configs/latent-diffusion/shapes-ldm.yaml"), "--base_ckpt", str(checkpoint),
                    "--lora_rank", "2", "--lora_targets", "unet", "--max_steps", "2", "--batch_size", "2",
                    "--num_workers", "0", "--logdir", str(tmp_path / "logs"), "--export", str(export), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lora = read_lora(export)
    assert lora.layers and all(name.startswith("lora_unet_") for name in lora.layers)
    assert len(list((tmp_path / "logs").glob("*/*.safetensors"))) == 1


@pytest.mark.parametrize("args, message", [
    (["--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--embedding", "lilac", "--export", "other.pt"], "write it as lilac.pt or lilac.safetensors"),
])
def test_bad_adapter_options_are_one_line_and_create_nothing(tmp_path, args, message):
    run = run_train("--base", str(REPO / "configs/latent-diffusion/shapes-ldm.yaml"), "--base_ckpt", "missing.ckpt",
                    "--logdir", str(tmp_path / "logs"), *args, cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in run.stderr
    assert sorted(tmp_path.iterdir()) == []
