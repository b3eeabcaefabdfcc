"""Input ranks: every method on tabular [B, F], sequences [B, C, T], images [B, C, H, W] and volumes
[B, C, D, H, W] (tests/support/ranks.py), the docs/input_ranks.md table checked cell by cell, and values
against captum (gradient and perturbation methods, any rank), pytorch-grad-cam (Grad-CAM, Grad-CAM++
and XGrad-CAM on 3-d convolutions) and hand computations with hooks and F.interpolate (1-d CAMs,
Score-CAM, Ablation-CAM, CAM's closed form, RISE's masks)."""
import math
import pathlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from torchex_fn.registry import METHODS as REGISTRY
from support.ranks import (BATCH, CALLS, GRID_RANKS, IMAGES_ONLY_ERRORS, NOT_IN_RANKS, OPTIONS,
                           RANKS, SHAPES, SUPPORTED,
                           ConvNet, expected_shape, functional, input_for)

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "input_ranks.md"
TARGET = torch.tensor([1, 2])
MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


# --------------------------------------------------------------------------------------------
# The methods: the registry's, each with its options here (tests/support/ranks.py OPTIONS).

def test_every_registry_method_has_a_ranks_entry_and_every_entry_a_registry_method():
    missing = set(REGISTRY) - set(OPTIONS) - set(NOT_IN_RANKS)
    assert not missing, f"registry methods without options in tests/support/ranks.py OPTIONS: {sorted(missing)}"
    assert set(OPTIONS) <= set(REGISTRY), sorted(set(OPTIONS) - set(REGISTRY))
    assert set(NOT_IN_RANKS) <= set(REGISTRY) and not set(OPTIONS) & set(NOT_IN_RANKS)
    assert list(SHAPES) == RANKS and set(GRID_RANKS) < set(RANKS)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_entry_options_are_options_of_its_registry_method(name):
    entry, options = REGISTRY[name], set(OPTIONS[name](input_for("image")))
    if entry.transform:  # smooth(method, ...): the method it wraps, then its own options
        options.discard("method")
    assert options <= set(entry.options), (name, sorted(options - set(entry.options)))


# --------------------------------------------------------------------------------------------
# The table: every cell runs (shape, dtype, finite) or raises the documented rank error.

@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", list(CALLS))
def test_cell(name, rank):
    _, fn, params = functional(rank)
    x = input_for(rank)
    if rank in SUPPORTED[name]:
        out = CALLS[name](fn, params, x, TARGET)
        assert out.shape == expected_shape(name, x) and out.dtype == x.dtype
        assert torch.isfinite(out).all() and out.abs().sum() > 0
    elif rank in IMAGES_ONLY_ERRORS.get(name, {}):
        with pytest.raises(ValueError, match=IMAGES_ONLY_ERRORS[name][rank]):
            CALLS[name](fn, params, x, TARGET)
    else:
        with pytest.raises(ValueError, match=rf"^{name}: expected x of rank (>= 3|3, 4 or 5) .*Tabular features "
                                             r"\[B, F\] have no grid: "):
            CALLS[name](fn, params, x, TARGET)


def _doc_table():
    """``{method: {column: cell}}`` parsed from the table of the "Method x rank" section of docs/input_ranks.md."""
    section = DOC.read_text().split("## Method x rank", 1)[1].split("\n## ", 1)[0].splitlines()
    header = next(line for line in section if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    table = {}
    for line in section:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0].strip("`")] = dict(zip(columns, cells[1:]))
    return table, columns


def test_docs_table_matches_the_cells():
    table, columns = _doc_table()
    assert columns[:4] == ["tabular `[B, F]`", "sequence `[B, C, T]`", "image `[B, C, H, W]`",
                           "volume `[B, C, D, H, W]`"]
    for name in CALLS:
        row = table[name]
        for rank, column in zip(RANKS, columns):
            assert row[column].startswith("yes" if rank in SUPPORTED[name] else "error"), (name, rank, row[column])
    # every attribution method exported today has a row (methods added later join by a row here
    # and an entry in tests/support/ranks.py OPTIONS)
    assert set(table) == set(CALLS) | {"attention_rollout", "grad_rollout", "legrad"}
    # attention methods: images upsampled, every rank on the token grid with upsample=False
    # (test_attention_maps_on_a_token_grid_at_every_rank_and_upsampled_for_images)
    for name in ("attention_rollout", "grad_rollout", "legrad"):
        for rank, column in zip(RANKS, columns):
            cell = table[name][column]
            assert cell.startswith("yes") and (rank == "image") == ("upsample=False" not in cell), (name, cell)


@pytest.mark.parametrize("name", ["grad_cam", "rise", "score_cam", "fullgrad"])
def test_more_than_three_grid_axes_is_refused_before_any_forward(name):
    calls = []

    def model_fn(params, x):
        calls.append(x.shape)
        return x.flatten(1)[:, :3]
    x = torch.randn(2, 1, 2, 2, 2, 2)
    call = {"grad_cam": lambda: tx.grad_cam(model_fn, {}, x, 0, layer="features"),
            "rise": lambda: tx.rise(model_fn, {}, x, 0, num_masks=2),
            "score_cam": lambda: tx.score_cam(model_fn, {}, x, 0, layer="features"),
            "fullgrad": lambda: tx.fullgrad(model_fn, {}, x, 0)}[name]
    with pytest.raises(ValueError, match=rf"^{name}: expected x of rank 3, 4 or 5 .*more than 3 axes"):
        call()
    assert calls == []


# --------------------------------------------------------------------------------------------
# Gradient and perturbation methods against captum, which works with any rank.

captum_attr = pytest.importorskip("captum.attr")


def _captum(name, model, x, target):
    x = x.clone().requires_grad_(True)  # captum warns when it has to set requires_grad itself
    with warnings.catch_warnings():     # and that it hooks ReLUs (guided backprop, DeepLift)
        warnings.simplefilter("ignore", UserWarning)
        return _captum_call(name, model, x, target)


def _captum_call(name, model, x, target):
    if name == "saliency":
        return captum_attr.Saliency(model).attribute(x, target=target, abs=False)
    if name == "input_x_gradient":
        return captum_attr.InputXGradient(model).attribute(x, target=target)
    if name == "integrated_gradients":
        return captum_attr.IntegratedGradients(model).attribute(x, 0.1 * torch.ones_like(x), target=target, n_steps=8)
    if name == "deeplift":
        return captum_attr.DeepLift(model).attribute(x, 0.1 * torch.ones_like(x), target=target)
    if name == "guided_backprop":
        return captum_attr.GuidedBackprop(model).attribute(x, target=target)
    raise AssertionError(name)


_OURS = {
    "saliency": lambda fn, p, x, t: tx.saliency(fn, p, x, t),
    "input_x_gradient": lambda fn, p, x, t: tx.input_x_gradient(fn, p, x, t),
    "integrated_gradients": lambda fn, p, x, t: tx.integrated_gradients(fn, p, x, t, baseline=0.1, steps=8),
    "deeplift": lambda fn, p, x, t: tx.deeplift(fn, p, x, t, baseline=0.1),
    "guided_backprop": lambda fn, p, x, t: tx.guided_backprop(fn, p, x, t),
}


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", list(_OURS))
def test_gradient_methods_match_captum_at_every_rank(name, rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    ours = _OURS[name](fn, params, x, TARGET)
    ref = _captum(name, model, x, TARGET).detach()
    assert ref.abs().max() > 1e-4
    # captum rounds its quadrature weights through float32 (integrated gradients): atol covers it.
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9 * (1 + 1e3 * (name == "integrated_gradients")))


@pytest.mark.parametrize("rank", RANKS)
def test_occlusion_matches_captum_at_every_rank(rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    window = (2,) if rank == "tabular" else (2, *([3] * (len(SHAPES[rank]) - 1)))
    stride = (1,) if rank == "tabular" else (1, *([2] * (len(SHAPES[rank]) - 1)))
    ours = tx.occlusion(fn, params, x, TARGET, window=window, stride=stride, baseline=0.2)
    ref = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=window, strides=stride, baselines=0.2,
                                                 target=TARGET)
    # captum returns float32 whatever x's dtype
    assert ref.abs().max() > 1e-4
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=1e-6 * ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# CAM family: hand computations with a hook, torch.autograd.grad and F.interpolate.

def _act(model, x):
    store = {}
    handle = model.features.register_forward_hook(lambda m, a, out: store.setdefault("a", out))
    try:
        out = model(x)
    finally:
        handle.remove()
    return out, store["a"]


def _act_grad(model, x, target):
    out, act = _act(model, x)
    return out, act, torch.autograd.grad(out.gather(1, target[:, None]).sum(), act)[0]


def _hand_cam(name, model, x, target):
    """The map at the layer's resolution from the papers' formulas (no ReLU)."""
    out, a, g = _act_grad(model, x, target)
    grid = tuple(range(2, a.ndim))
    if name == "grad_cam":
        w = g.mean(grid, keepdim=True)
    elif name == "grad_cam_pp":
        alpha = g ** 2 / (2 * g ** 2 + a.sum(grid, keepdim=True) * g ** 3 + 1e-6)
        w = (torch.where(g != 0, alpha, 0) * g.clamp_min(0)).sum(grid, keepdim=True)
    elif name == "layer_cam":
        w = g.clamp_min(0)
    elif name == "xgrad_cam":
        w = (g * a).sum(grid, keepdim=True) / (a.sum(grid, keepdim=True) + 1e-7)
    elif name == "hires_cam":
        w = g
    elif name == "cam":
        w = model.fc.weight[target].reshape(*target.shape, -1, *([1] * len(grid)))
    else:
        raise AssertionError(name)
    return (w * a).sum(1, keepdim=True)


@pytest.mark.parametrize("rank", GRID_RANKS)
@pytest.mark.parametrize("name", ["cam", "grad_cam", "grad_cam_pp", "layer_cam", "xgrad_cam", "hires_cam"])
def test_cam_family_equals_the_hand_computation_with_linear_trilinear_upsampling(name, rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    method = getattr(tx, name)
    raw = method(fn, params, x, TARGET, layer="features", relu=False, upsample=False)
    full = method(fn, params, x, TARGET, layer="features", relu=False)
    ref = _hand_cam(name, model, x, TARGET)
    assert raw.shape == (BATCH, 1, *[math.ceil(s / 2) for s in SHAPES[rank][1:]])
    assert ref.abs().max() > 1e-4
    torch.testing.assert_close(raw, ref, rtol=1e-9, atol=1e-12)
    upsampled = F.interpolate(ref, size=x.shape[2:], mode=MODES[x.ndim - 2], align_corners=False)
    torch.testing.assert_close(full, upsampled, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", GRID_RANKS)
def test_cam_closed_form_the_map_mean_plus_bias_is_the_logit(rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    maps = tx.cam(fn, params, x, TARGET, layer="act2", upsample=False)   # the layer that feeds the pooling
    logits = model(x).gather(1, TARGET[:, None])[:, 0]
    torch.testing.assert_close(maps.flatten(1).mean(1) + model.fc.bias[TARGET], logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", GRID_RANKS)
def test_score_cam_equals_the_hand_computation(rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    with torch.no_grad():
        out, act = _act(model, x)
        weights = torch.zeros(BATCH, act.shape[1], dtype=x.dtype)
        for b in range(BATCH):
            for k in range(act.shape[1]):
                m = F.interpolate(act[b:b + 1, k:k + 1], size=x.shape[2:], mode=MODES[x.ndim - 2],
                                  align_corners=False)
                m = (m - m.min()) / (m.max() - m.min() + 1e-8)
                weights[b, k] = torch.softmax(model(x[b:b + 1] * m), dim=1)[0, TARGET[b]]
        ref = (weights.reshape(*weights.shape, *([1] * (act.ndim - 2))) * act).sum(1, keepdim=True)
    ours = tx.score_cam(fn, params, x, TARGET, layer="features", relu=False, upsample=False, batch_size=3)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert ref.abs().max() > 1e-4


@pytest.mark.parametrize("rank", GRID_RANKS)
def test_ablation_cam_equals_the_hand_computation(rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    with torch.no_grad():
        out, act = _act(model, x)
        base = out.gather(1, TARGET[:, None])[:, 0]
        weights = torch.zeros(BATCH, act.shape[1], dtype=x.dtype)
        for k in range(act.shape[1]):
            def zero_k(module, args, output, k=k):
                output = output.clone()
                output[:, k] = 0
                return output
            handle = model.features.register_forward_hook(zero_k)
            try:
                ablated = model(x).gather(1, TARGET[:, None])[:, 0]
            finally:
                handle.remove()
            weights[:, k] = (base - ablated) / base
        ref = (weights.reshape(*weights.shape, *([1] * (act.ndim - 2))) * act).sum(1, keepdim=True)
    ours = tx.ablation_cam(fn, params, x, TARGET, layer="features", relu=False, upsample=False, batch_size=4)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


# pytorch-grad-cam supports 3-d convolutions (5-d activations) in GradCAM, GradCAMPlusPlus and
# XGradCAM (base_cam.get_cam_image); its raw map is get_cam_image on the recorded activations and
# gradients, before its min-max scaling and scipy zoom.
@pytest.mark.parametrize("name", ["grad_cam", "grad_cam_pp", "xgrad_cam"])
def test_volume_maps_match_pytorch_grad_cam(name):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(0)
    model = ConvNet(3).eval()                       # float32: pytorch-grad-cam computes in numpy float32
    fn, params = tx.functionalize(model)
    x = input_for("volume", torch.float32)
    cls = {"grad_cam": pgc.GradCAM, "grad_cam_pp": pgc.GradCAMPlusPlus, "xgrad_cam": pgc.XGradCAM}[name]
    targets = [ClassifierOutputTarget(int(c)) for c in TARGET]
    with cls(model=model, target_layers=[model.features]) as extractor:
        final = extractor(input_tensor=x, targets=targets)
        rec = extractor.activations_and_grads
        raw = np.maximum(extractor.get_cam_image(x, model.features, targets, rec.activations[0].numpy(),
                                                 rec.gradients[0].numpy()), 0)
    model.zero_grad(set_to_none=True)
    assert final.shape == (BATCH, 6, 8, 8)
    ours = getattr(tx, name)(fn, params, x, TARGET, layer="features", upsample=False)[:, 0]
    ref = torch.from_numpy(raw)
    assert ref.abs().max() > 1e-4
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# RISE: masks of the input's rank, and the map against an all-masks reference.

def _reference_masks(num_masks, cells, p, size, generator):
    """All masks the plain way: F.interpolate (linear / trilinear) the grid, then crop in a loop,
    drawing in the implementation's blocks and order (grids, then the offsets axis by axis)."""
    from torchex_fn.core.random_masks import DRAW_BLOCK
    steps = [math.ceil(n / cells) for n in size]
    out = []
    for start in range(0, num_masks, DRAW_BLOCK):
        n = min(DRAW_BLOCK, num_masks - start)
        grid = (torch.rand(n, *([cells] * len(size)), generator=generator) < p).to(torch.float64)
        offsets = [torch.randint(s, (n,), generator=generator) for s in steps]
        up = F.interpolate(grid[:, None], size=[(cells + 1) * s for s in steps], mode=MODES[len(size)],
                           align_corners=False)[:, 0]
        for i in range(n):
            out.append(up[(i, *[slice(int(o[i]), int(o[i]) + s) for o, s in zip(offsets, size)])])
    return torch.stack(out)


@pytest.mark.parametrize("size", [(21,), (5, 7, 6)])
def test_rise_masks_equal_interpolate_then_crop(size):
    from torchex_fn.core.random_masks import draw, interpolation_matrix
    cells = 4
    weights = tuple(interpolation_matrix(cells, (cells + 1) * math.ceil(n / cells), torch.float64,
                                         torch.device("cpu")) for n in size)
    masks = draw(50, cells, 0.3, size, weights, torch.Generator().manual_seed(1))
    expected = _reference_masks(50, cells, 0.3, size, torch.Generator().manual_seed(1))
    assert masks.shape == (50, *size)
    torch.testing.assert_close(masks, expected, rtol=0, atol=1e-12)
    assert masks.min() >= 0 and masks.max() <= 1 and 0 < masks.mean() < 1
    # every axis is shifted: the masks differ along each axis, not only along the first
    assert all(masks.flatten(0, 0).std(dim=d + 1).mean() > 0 for d in range(len(size)))


@pytest.mark.parametrize("rank", ["sequence", "volume"])
def test_rise_equals_an_all_masks_reference(rank):
    model, fn, params = functional(rank)
    x = input_for(rank)
    num, p = 40, 0.4
    sal = tx.rise(fn, params, x, TARGET, num_masks=num, cell_size=3, probability=p, batch_size=6,
                  generator=torch.Generator().manual_seed(5))
    masks = _reference_masks(num, 3, p, tuple(x.shape[2:]), torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch.stack([
            torch.einsum("n,n...->...", torch.softmax(model(x[b:b + 1] * masks[:, None]), dim=1)[:, TARGET[b]], masks)
            / (num * p) for b in range(BATCH)])[:, None]
    assert sal.shape == (BATCH, 1, *x.shape[2:])
    torch.testing.assert_close(sal, expected, rtol=1e-10, atol=1e-12)


def test_rise_on_a_dict_entry_of_rank_three():
    model, _, _ = functional("sequence")

    def model_fn(params, x):
        return model(x["signal"]) * x["scale"][:, None]
    x = {"signal": input_for("sequence"), "scale": torch.tensor([1.0, 2.0], dtype=torch.float64).to(torch.long)}
    out = tx.rise(model_fn, {}, x, TARGET, num_masks=8, cell_size=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (BATCH, 1, 20)


# --------------------------------------------------------------------------------------------
# Attention methods: maps on a 2-d token grid; upsampling only to images.

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, tokens):
        return tokens + self.attn(tokens, tokens, tokens)[0]


class _TokenNet(nn.Module):
    """Patches of any rank -> one self-attention block (nn.MultiheadAttention) -> mean -> fc."""

    def __init__(self, dims):
        super().__init__()
        self.embed = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 8, 2, stride=2) if dims else nn.Linear(1, 8)
        self.block = _Block()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x[..., None]) if x.ndim == 2 else self.embed(x).flatten(2).transpose(1, 2)
        return self.fc(self.block(tokens).mean(1))


_ATTENTION = {"attention_rollout": dict(token=None), "grad_rollout": dict(token=None),
              "legrad": dict(blocks=["block"], head="fc")}


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("name", list(_ATTENTION))
def test_attention_maps_on_a_token_grid_at_every_rank_and_upsampled_for_images(name, rank):
    model = _TokenNet(len(SHAPES[rank]) - 1).double().eval()
    fn, params = tx.functionalize(model)
    x = input_for(rank)
    tokens = 6 if rank == "tabular" else math.prod(s // 2 for s in SHAPES[rank][1:])
    method = getattr(tx, name)
    options = dict(_ATTENTION[name], prefix_tokens=0)
    out = method(fn, params, x, TARGET, grid=(1, tokens), upsample=False, **options)
    assert out.shape == (BATCH, 1, 1, tokens) and torch.isfinite(out).all() and out.abs().sum() > 0
    if rank == "image":
        assert method(fn, params, x, TARGET, **options).shape == (BATCH, 1, 8, 8)
    else:
        with pytest.raises(ValueError, match=rf"^{name}: expected x of shape \[B, C, H, W\] to upsample"):
            method(fn, params, x, TARGET, grid=(1, tokens), **options)
