"""Vision-language core and VHD / VHR on a tiny random LLaVA (CLIP vision tower + Llama), checked
against an independent eager computation (hooks on o_proj's input give every head's output)."""

from __future__ import annotations

import pytest
import torch
import transformers

from headlab import HeadlabError, StatsRequest, load_model
from headlab.analyses.vision_heads import VisionSample, score, vhd_sample, vhr_generate
from headlab.vision import encode, image_positions, without_image

IMAGE_TOKEN, N_IMAGE = 99, 16  # a 32x32 image in 8x8 patches: 16 image tokens


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                                      architectures=["LlavaForConditionalGeneration"])
    path = tmp_path_factory.mktemp("llava")
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(llava_dir):
    return load_model(llava_dir, load_tokenizer=False)


@pytest.fixture(scope="module")
def eager(llava_dir):
    return transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="eager").eval()


@pytest.fixture
def sample():
    torch.manual_seed(1)
    return VisionSample(torch.tensor([1, 5] + [IMAGE_TOKEN] * N_IMAGE + [7, 8, 9]), torch.randn(1, 3, 32, 32))


def eager_head_outputs(eager, input_ids, pixel_values=None) -> torch.Tensor:
    """[L, T, H, Dv] every head's output, read off o_proj's input by forward hooks."""
    captured = []
    layers = eager.model.language_model.layers
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0][0])) for layer in layers]
    try:
        with torch.no_grad():
            eager(input_ids=input_ids[None], pixel_values=pixel_values)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(captured).view(len(layers), input_ids.numel(), 4, -1)


def test_spec_and_image_span_stats(model, eager, sample):
    assert model.spec.modality == "vision-language" and model.spec.image_token_id == IMAGE_TOKEN
    assert len(model._modules) == 2  # the language model's layers only, not the vision tower's
    pos = image_positions(model.spec, sample.input_ids)
    assert pos.tolist() == list(range(2, 2 + N_IMAGE))
    with model.patched(None, StatsRequest(spans={"image": pos.tolist()}, queries=slice(-1, None))) as rec:
        model(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values)
    with torch.no_grad():
        attn = eager(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values, output_attentions=True).attentions
    expected = torch.stack([a[0, :, -1, pos].sum(-1) for a in attn])  # [L, H]
    torch.testing.assert_close(rec.stats.span_mass("image")[:, 0, :, 0], expected, atol=1e-5, rtol=1e-4)
    assert without_image(model.spec, sample.input_ids).tolist() == [1, 5, 7, 8, 9]


def test_vhd_equals_an_eager_computation(model, eager, sample):
    reading = vhd_sample(model, sample, max_new_tokens=4)
    gen = torch.tensor(reading.generated)
    steps = gen.numel()
    assert reading.vhd.shape == (steps, 2, 4) and steps == 4
    n = sample.input_ids.numel()
    with_image = eager_head_outputs(eager, torch.cat([sample.input_ids, gen[:-1]]), sample.pixel_values)
    text = without_image(model.spec, sample.input_ids)
    m = text.numel()
    text_only = eager_head_outputs(eager, torch.cat([text, gen[:-1]]))
    z_img = with_image[:, n - 1: n - 1 + steps]  # [L, steps, H, Dv]
    z_txt = text_only[:, m - 1: m - 1 + steps]
    expected = (z_img - z_txt).norm(dim=-1).permute(1, 0, 2)  # [steps, L, H]
    torch.testing.assert_close(reading.vhd, expected, atol=1e-4, rtol=1e-4)
    assert float(reading.vhd.min()) > 0  # a random image changes every head's output

    scores, per_sample = score(model, [sample], max_new_tokens=4, progress=False)
    torch.testing.assert_close(per_sample[0].float(), expected.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores.values.float(), expected.mean(0), atol=1e-4, rtol=1e-4)
    assert scores.analysis == "vhd" and float(scores.counts[0, 0]) == steps


def test_vhr_alpha_one_is_greedy_and_reinforces_the_top_vhd_heads(model, sample):
    with model.patched(None):
        plain = model.generate(input_ids=sample.input_ids[None], pixel_values=sample.pixel_values, max_new_tokens=5,
                               do_sample=False)[0, sample.input_ids.numel():].tolist()
    same = vhr_generate(model, sample, alpha=1.0, k=2, max_new_tokens=5)
    assert same.generated == plain
    # step 0 reinforces each layer's top-2 heads by the VHD of the first generated token
    first = vhd_sample(model, sample, max_new_tokens=1).vhd[0]
    expected = [(layer, h) for layer in range(2) for h in torch.topk(first[layer], 2).indices.tolist()]
    assert same.reinforced[0] == expected
    boosted = vhr_generate(model, sample, alpha=4.0, k=2, max_new_tokens=5)
    assert boosted.reinforced[0] == expected and boosted.generated != plain
    only_layer_1 = vhr_generate(model, sample, alpha=4.0, k=1, max_new_tokens=2, layers=[1])
    assert all(layer == 1 for step in only_layer_1.reinforced for layer, _ in step)


def test_vision_errors(model, sample):
    no_image = VisionSample(torch.tensor([1, 5, 7, 8]), sample.pixel_values)
    with pytest.raises(HeadlabError, match="no image tokens"):
        vhd_sample(model, no_image)
    with pytest.raises(HeadlabError, match=r"pixel_values must be \[1, 3, H, W\]"):
        vhd_sample(model, VisionSample(sample.input_ids, torch.randn(32, 32)))
    with pytest.raises(HeadlabError, match="alpha must be >= 0"):
        vhr_generate(model, sample, alpha=-1)
    with pytest.raises(HeadlabError, match="layer 5 does not exist"):
        vhr_generate(model, sample, layers=[5])
    with pytest.raises(HeadlabError, match="loaded without its processor"):
        encode(model, "<image> what colour?", object())
    text_model = load_model("zoo:tasks-llama")
    with pytest.raises(HeadlabError, match="is a text model"):
        image_positions(text_model.spec, torch.tensor([1, 2, 3]))
