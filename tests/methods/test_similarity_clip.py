"""Image–text models: HuggingFace CLIP built from a small config (random weights). The image is
explained by its cosine similarity to a text's embedding (``tx.targets.similarity`` on
``CLIPVisionModelWithProjection``'s ``image_embeds``), and the text's tokens by their similarity to an
image (``layer=`` at the token embeddings of ``CLIPTextModelWithProjection``); each map equals the
gradient of ``F.cosine_similarity`` taken by hand with torch.autograd."""
import pytest
import torch
import torch.nn.functional as F

import torchex_fn as tx

transformers = pytest.importorskip("transformers")


def _clip():
    torch.manual_seed(0)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": 16}
    vision = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(image_size=32, patch_size=8, **common)).eval()
    text = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(vocab_size=64, max_position_embeddings=16, **common)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    return vision, text, pixels, ids


def test_image_explained_by_similarity_to_a_text():
    vision, text, pixels, ids = _clip()
    with torch.no_grad():
        concept = text(input_ids=ids[:1]).text_embeds[0]
    fn, params = tx.functionalize(vision)
    target = tx.targets.similarity(concept)
    got = tx.saliency(fn, params, pixels, target)
    leaf = pixels.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cosine_similarity(vision(pixel_values=leaf).image_embeds, concept[None]).sum(),
                                  leaf)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    scores = target(vision(pixel_values=pixels))
    assert scores.shape == (2,) and (scores.abs() <= 1).all()


def test_text_tokens_explained_by_similarity_to_an_image():
    vision, text, pixels, ids = _clip()
    with torch.no_grad():
        concept = vision(pixel_values=pixels[:1]).image_embeds[0]
    fn, params = tx.functionalize(text)
    layer = "text_model.embeddings.token_embedding"
    got = tx.input_x_gradient(fn, params, ids, tx.targets.similarity(concept), layer=layer)     # [2, 7, 32]
    acts = []
    handle = dict(text.named_modules())[layer].register_forward_hook(
        lambda m, i, o: acts.append(o.detach().requires_grad_(True)) or acts[-1])
    try:
        score = F.cosine_similarity(text(input_ids=ids).text_embeds, concept[None]).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, acts[0])
    want = (acts[0] * grad).detach()
    assert got.shape == (2, 7, 32) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
