"""Image–text models: HuggingFace SigLIP built from a small config (random weights). The image is explained by
its cosine similarity to a text's embedding (``tx.targets.similarity`` on ``SiglipVisionModel``'s
``pooler_output``, the attention-pooled embedding ``SiglipModel.get_image_features`` returns), by saliency and by
Grad-CAM on the patch tokens; the text's tokens by their similarity to an image (``layer=`` at the token
embeddings of ``SiglipTextModel``). Each map equals the gradient of ``F.cosine_similarity`` taken by hand with
torch.autograd (Grad-CAM: its channel weights, the mean gradient over the 4 x 4 patch grid, computed here)."""
import pytest
import torch
import torch.nn.functional as F

import torchex_fn as tx

transformers = pytest.importorskip("transformers")


def _siglip():
    torch.manual_seed(0)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=32, patch_size=8,
                                                                            **common)).eval()
    ids_config = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}   # within the small vocabulary
    text = transformers.SiglipTextModel(transformers.SiglipTextConfig(vocab_size=64, max_position_embeddings=16,
                                                                      **ids_config, **common)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    return vision, text, pixels, ids


def _text_concept(text, ids):
    with torch.no_grad():
        return text(input_ids=ids[:1]).pooler_output[0]


def test_image_explained_by_similarity_to_a_text():
    vision, text, pixels, ids = _siglip()
    concept = _text_concept(text, ids)
    fn, params = tx.functionalize(vision)
    target = tx.targets.similarity(concept)
    got = tx.saliency(fn, params, pixels, target)
    leaf = pixels.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cosine_similarity(vision(pixel_values=leaf).pooler_output, concept[None]).sum(),
                                  leaf)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    scores = target(vision(pixel_values=pixels))
    assert scores.shape == (2,) and (scores.abs() <= 1).all()


def test_grad_cam_on_the_patch_tokens():
    vision, text, pixels, ids = _siglip()
    concept = _text_concept(text, ids)
    fn, params = tx.functionalize(vision)
    layer = "encoder.layers.1"
    grid = tx.postprocess.tokens_to_grid(prefix_tokens=0)     # SigLIP has no class token: 16 patches, 4 x 4
    got = tx.grad_cam(fn, params, pixels, tx.targets.similarity(concept), layer=layer, reshape=grid, relu=False,
                      upsample=False)
    acts = []

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        acts.append(hidden)
        hidden.retain_grad()
    handle = vision.get_submodule(layer).register_forward_hook(keep)
    try:
        score = F.cosine_similarity(vision(pixel_values=pixels).pooler_output, concept[None]).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, acts[0])
    act = acts[0].detach()                                    # [2, 16, 32]
    weights = grad.mean(dim=1, keepdim=True)                  # [2, 1, 32]: the mean over the patches
    want = (act * weights).sum(-1).reshape(2, 1, 4, 4)
    assert got.shape == (2, 1, 4, 4) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_text_tokens_explained_by_similarity_to_an_image():
    vision, text, pixels, ids = _siglip()
    with torch.no_grad():
        concept = vision(pixel_values=pixels[:1]).pooler_output[0]
    fn, params = tx.functionalize(text)
    layer = "embeddings.token_embedding"
    got = tx.input_x_gradient(fn, params, ids, tx.targets.similarity(concept), layer=layer)     # [2, 7, 32]
    acts = []
    handle = dict(text.named_modules())[layer].register_forward_hook(
        lambda m, i, o: acts.append(o.detach().requires_grad_(True)) or acts[-1])
    try:
        score = F.cosine_similarity(text(input_ids=ids).pooler_output, concept[None]).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, acts[0])
    want = (acts[0] * grad).detach()
    assert got.shape == (2, 7, 32) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
