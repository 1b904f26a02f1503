"""A1111's prompt syntax in the generation loop: weights, long prompts, editing, alternation, AND, clip skip.

Most tests swap the tiny UNet for a cheap stand-in that records the conditioning of every model call, so
that what is checked is what the model is given; the text encoder is the tiny model's own.
"""
import pytest
import torch
from transformers import CLIPTextModel

from ldm.generate.conditioning import Conditioner
from ldm.generate.output import OutputFolder
from ldm.generate.run import Job, job_fields
from ldm.generate.txt2img import Txt2ImgJob, run_txt2img
from ldm.models.diffusion.sampling import GuidedDenoiser
from ldm.modules.encoders.modules import BPETextTransformer, FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import SD1_PAD_TOKEN, tokenize
from ldm.modules.prompt_encoding import EmbeddingFix
from helpers import loaded_tiny

WIDTH = 32  # the tiny text encoder's width
LONG_PROMPT = " ".join(["red"] * 150)  # 150 tokens: two full chunks


@pytest.fixture(scope="module")
def loaded():
    return loaded_tiny()


class RecordingModel:
    """apply_model's stand-in: records each call's text conditioning, returns a function of it per row."""

    def __init__(self, loaded, monkeypatch):
        self.calls = []
        monkeypatch.setattr(loaded.model, "apply_model", self)

    def __call__(self, x, t, cond):
        self.calls.append(cond.clone())
        return x * 0.5 + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1).to(x)


def generate(loaded, prompt, tmp_path, steps=4, negative="", scale=7.5, **job_options):
    """The run's final latents (what is decoded) and the log lines."""
    finals, lines = [], []
    import ldm.generate.run as run_module
    real_sample = run_module.sample

    def keeping_result(*args, **kwargs):
        finals.append(real_sample(*args, **kwargs))
        return finals[-1]

    run_module.sample = keeping_result
    try:
        job = Txt2ImgJob(batches=[[prompt]], steps=steps, height=64, width=64, save_grid=False, scale=scale,
                         negative_prompt=negative, **job_options)
        run_txt2img(job, loaded, OutputFolder(tmp_path, save_samples=False), log=lines.append)
    finally:
        run_module.sample = real_sample
    return finals[0], lines


def same(first, second) -> bool:
    """Equal up to float rounding: batches of other sizes may round the encoder's matmuls differently."""
    return first.shape == second.shape and torch.allclose(first, second, rtol=0, atol=1e-6)


def encoded(loaded, texts):
    """The encoder's own forward pass on plain texts: [len(texts), 77, width]."""
    with torch.inference_mode():
        return loaded.model.cond_stage_model(list(texts))


def test_a_weighted_prompt_changes_the_image_and_weight_1_does_not(loaded, tmp_path, monkeypatch):
    RecordingModel(loaded, monkeypatch)
    plain, _ = generate(loaded, "a red circle", tmp_path)
    weighted, _ = generate(loaded, "a (red:1.5) circle", tmp_path)
    same, _ = generate(loaded, "a (red:1.0) circle", tmp_path)
    assert not torch.equal(plain, weighted)
    assert torch.equal(plain, same)


def test_a_plain_prompt_gives_the_encoders_own_conditioning(loaded, tmp_path, monkeypatch):
    model = RecordingModel(loaded, monkeypatch)
    generate(loaded, "a red circle", tmp_path, steps=2, negative="blurry")
    expected = torch.cat([encoded(loaded, ["blurry"]), encoded(loaded, ["a red circle"])])
    assert all(torch.equal(cond, expected) for cond in model.calls) and len(model.calls) == 2


def test_a_long_prompt_is_two_chunks_and_nothing_is_cut(loaded, tmp_path, monkeypatch):
    model = RecordingModel(loaded, monkeypatch)
    _, lines = generate(loaded, LONG_PROMPT, tmp_path, steps=1)
    cond = model.calls[0]
    assert cond.shape == (2, 154, WIDTH)
    assert lines == []
    empty = encoded(loaded, [""])
    assert torch.equal(cond[:1, 77:], empty)  # the empty negative prompt padded with an empty chunk
    assert not torch.equal(cond[1:, 77:], empty)


def test_prompt_editing_switches_the_conditioning_at_a1111s_step(loaded, tmp_path, monkeypatch):
    model = RecordingModel(loaded, monkeypatch)
    generate(loaded, "[red circle:blue square:0.5]", tmp_path, steps=10, scale=1.0)
    red, blue = encoded(loaded, ["red circle", "blue square"]).split(1)
    # A1111: the schedule ends "red circle" at step int(0.5 * 10) = 5, and model call i (from 0) uses the
    # first text whose end is >= i: calls 0..5 red, 6..9 blue.
    assert not same(red, blue)
    assert [same(cond, red) for cond in model.calls] == [True] * 6 + [False] * 4
    assert all(same(cond, blue) for cond in model.calls[6:])


def test_a_second_order_samplers_schedule_counts_its_model_calls(loaded, tmp_path, monkeypatch):
    model = RecordingModel(loaded, monkeypatch)
    generate(loaded, "[red circle:blue square:0.5]", tmp_path, steps=3, scale=1.0, sampler="heun")
    red, blue = encoded(loaded, ["red circle", "blue square"]).split(1)
    # A1111 builds Heun's schedule over 2 x 3 = 6 steps ("red circle" to 3) and counts model calls: Heun's
    # 5 calls (its last step is an Euler step) are red, red, red, red, blue.
    assert [same(cond, red) for cond in model.calls] == [True] * 4 + [False]
    assert same(model.calls[-1], blue)


def test_alternation_changes_the_text_as_a1111s_model_calls_count(loaded, tmp_path, monkeypatch):
    model = RecordingModel(loaded, monkeypatch)
    generate(loaded, "a [red|blue] circle", tmp_path, steps=5, scale=1.0)
    red, blue = encoded(loaded, ["a red circle", "a blue circle"]).split(1)
    assert not same(red, blue)
    # A1111's schedule: red to step 1, blue to 2, red to 3 ...; call i (from 0) takes the first entry whose
    # end is >= i (reconstruct_cond_batch), so calls 0 and 1 both read red before the texts alternate.
    assert [same(cond, red) for cond in model.calls] == [True, True, False, True, False]
    assert [same(cond, blue) for cond in model.calls] == [False, False, True, False, True]


def test_and_combines_the_guided_predictions_as_a1111(loaded):
    outputs = []

    class Model:
        alphas_cumprod, parameterization = loaded.model.alphas_cumprod, "eps"

        def apply_model(self, x, t, cond):
            outputs.append(torch.randn(x.shape, generator=torch.Generator().manual_seed(len(outputs))))
            outputs.append(cond)
            return outputs[-2]

    conditioner = Conditioner(loaded, log=print)
    with torch.inference_mode():
        cond = conditioner(["a red circle AND a blue square :0.5"], composable=True).scheduled(4)
        uncond = conditioner(["blurry"]).scheduled(4)
    denoiser = GuidedDenoiser(Model(), cond, uncond, scale=7.0, dtype=torch.float32, device="cpu")
    x = torch.randn(1, 4, 8, 8)
    output, _ = denoiser.model_output(x, 500)
    predictions, conditioning = outputs
    assert predictions.shape[0] == 3  # uncond, then the two parts
    assert same(conditioning, encoded(loaded, ["blurry", "a red circle", "a blue square"]))
    uncond_out, part_1, part_2 = predictions.split(1)
    expected = uncond_out + (part_1 - uncond_out) * (1.0 * 7.0) + (part_2 - uncond_out) * (0.5 * 7.0)
    assert torch.allclose(output, expected, atol=1e-6)


def test_and_parts_repeat_the_images_other_conditioning(loaded):
    seen = []

    class Model:
        alphas_cumprod, parameterization = loaded.model.alphas_cumprod, "eps"

        def apply_model(self, x, t, cond):
            seen.append((x, cond))
            return torch.zeros_like(x)

    conditioner = Conditioner(loaded, log=print)
    with torch.inference_mode():
        cond = conditioner(["a AND b AND c", "d"], composable=True).scheduled(2)
        uncond = conditioner(["", ""]).scheduled(2)
    image = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 4, 4)
    denoiser = GuidedDenoiser(Model(), {"c_concat": [image], "c_crossattn": [cond]},
                              {"c_concat": [image], "c_crossattn": [uncond]}, scale=5.0, dtype=torch.float32,
                              device="cpu")
    x = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 4, 4, 4)
    denoiser.model_output(x, 10)
    model_x, model_cond = seen[0]
    assert model_x[:, 0, 0, 0].tolist() == [0, 1, 0, 0, 0, 1]  # uncond of both images, then the 4 parts
    assert model_cond["c_concat"][0][:, 0, 0, 0].tolist() == [0, 1, 0, 0, 0, 1]
    assert model_cond["c_crossattn"][0].shape == (6, 77, WIDTH)


def test_clip_skip_2_is_the_penultimate_layer_then_the_final_norm():
    torch.manual_seed(0)
    ours = FrozenCLIPEmbedder()  # full-size SD 1.x text encoder, random weights
    # transformers' own CLIPTextModel, the one ours holds (as ours.transformer on transformers < 5.6)
    reference = next(module for module in ours.modules() if isinstance(module, CLIPTextModel))
    tower = getattr(reference, "text_model", reference)  # transformers >= 5.6 has no text_model level
    tokens, _ = tokenize(["a photograph of an astronaut riding a horse"], SD1_PAD_TOKEN)
    with torch.no_grad():
        hidden = reference(input_ids=tokens, output_hidden_states=True).hidden_states
        last = ours.encode_tokens(tokens)
        ours.set_clip_skip(2)
        skipped = ours.encode_tokens(tokens)
    final_norm = tower.final_layer_norm
    assert torch.allclose(skipped, final_norm(hidden[-2]), atol=1e-5)
    assert torch.allclose(last, final_norm(hidden[-1]), atol=1e-5)
    assert not torch.allclose(skipped, last, atol=1e-2)
    with pytest.raises(ValueError, match="1..12"):
        ours.set_clip_skip(13)


def test_clip_skip_on_our_encoder_leaves_out_the_last_blocks():
    torch.manual_seed(0)
    encoder = BPETextTransformer(n_embed=32, n_layer=3, n_head=2, token_dim=8).eval()
    tokens, _ = tokenize(["a red circle"], SD1_PAD_TOKEN)
    encoder.set_clip_skip(3)
    with torch.no_grad():
        x = encoder.token_projection(encoder.token_embedding(tokens)) + encoder.positional_embedding
        expected = encoder.ln_final(encoder.transformer.resblocks[0](x, False))
        assert torch.equal(encoder.encode_tokens(tokens), expected)


def test_embedding_fixes_replace_the_token_embeddings(loaded):
    encoder = loaded.model.cond_stage_model
    tokens, _ = tokenize(["a red circle"], SD1_PAD_TOKEN)
    swapped, _ = tokenize(["a blue green"], SD1_PAD_TOKEN)

    class Embedding:  # two vectors: those of "blue green"
        vectors = encoder.token_embedding.weight[swapped[0, 2:4]]

    with torch.inference_mode():
        fixed = encoder.encode_tokens(tokens, [[EmbeddingFix(2, Embedding)]])
        assert torch.equal(fixed, encoder.encode_tokens(swapped))
        assert torch.equal(encoder.encode_tokens(tokens, [[]]), encoder(["a red circle"]))


def test_clip_skip_and_emphasis_in_the_infotext_after_denoising_strength(loaded):
    job = Job(batches=[["a"]], clip_skip=2, emphasis="no norm")
    fields = job_fields(job, loaded, 1, 0, {"Denoising strength": 0.75})
    keys = list(fields)
    assert keys.index("Clip skip") == keys.index("Denoising strength") + 1
    assert fields["Clip skip"] == 2 and fields["Emphasis"] == "No norm"
    plain = job_fields(Job(batches=[["a"]]), loaded, 1, 0)
    assert "Clip skip" not in plain and "Emphasis" not in plain


def test_clip_skip_beyond_the_encoders_layers_is_one_line(loaded, tmp_path, monkeypatch):
    from ldm.generate.errors import UserError
    RecordingModel(loaded, monkeypatch)
    with pytest.raises(UserError, match=r"--clip_skip 2: .*1\.\.1.*pass a smaller --clip_skip"):
        generate(loaded, "a", tmp_path, steps=1, clip_skip=2)
