"""``lrp(..., layer=)`` (relevance at a layer's output) and ``lrp(..., condition=)`` (CRP concept heatmaps).

Closed forms on a hand-weighted two-layer net, conservation through a layer, equality with zennit 0.5.1's
relevance at a layer (a forward hook storing the layer's output with ``retain_grad``, as zennit users
read it), the concept heatmaps of all channels summing to the unconditioned map, and the errors.
Parity of both with zennit-crp 0.6.0 is in tests/composite/test_concepts.py.
"""
import pytest
import torch
from torch import nn

import torchex_fn as tx

from support.models import torchvision_lrp_model

pytestmark = pytest.mark.usefixtures("one_thread")

W1 = [[1.0, 2.0], [-1.0, 1.0], [0.5, -3.0]]
W2 = [[1.0, -1.0, 2.0], [0.5, 1.0, 1.0]]


def _two_layer():
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(W1))
        model[2].weight.copy_(torch.tensor(W2))
    return model


def _stab(t, eps):
    return torch.where(t >= 0, t + eps, t - eps)


def test_layer_and_condition_closed_form():
    """epsilon rule on both layers: R_h = h_j w2_cj out_c / stab(out_c), R_i|j = x_i w1_ji R_h_j / stab(z_j)."""
    fn, params = tx.functionalize(_two_layer())
    x = torch.tensor([[2.0, -0.5], [-1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    eps = 0.1  # large, so that the stabiliser shows in the numbers
    w1, w2 = torch.tensor(W1, dtype=torch.float64), torch.tensor(W2, dtype=torch.float64)
    z = x @ w1.T                                          # [3, 3] hidden pre-activations
    h = z.clamp(min=0)
    out = h @ w2.T
    out_c = out.gather(1, target[:, None])                # [3, 1]
    w2_c = w2[target]                                     # [3, 3]
    r_hidden = h * w2_c * out_c / _stab(out_c, eps)       # relevance at the hidden layer (ReLU passes it)
    for layer in ("0", "1"):
        got = tx.lrp(fn, params, x, target, composite="epsilon_plus", epsilon=eps, layer=layer)
        torch.testing.assert_close(got, r_hidden, rtol=1e-12, atol=1e-14)
    # concept j: only hidden unit j's relevance goes on to the input
    expected = x[:, None, :] * w1[None] * (r_hidden / _stab(z, eps))[:, :, None]      # [B, K=3, 2]
    got = tx.lrp(fn, params, x, target, composite="epsilon_plus", epsilon=eps, condition={"0": [0, 1, 2]})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert got[1, 2].abs().sum() == 0 and got[0, 2].abs().sum() > 0   # unit 2 is off for example 1 (z = -6.5)
    one = tx.lrp(fn, params, x, target, composite="epsilon_plus", epsilon=eps, condition={"0": 2})
    torch.testing.assert_close(one, expected[:, 2], rtol=1e-12, atol=1e-14)
    group = tx.lrp(fn, params, x, target, composite="epsilon_plus", epsilon=eps, condition={"0": [[0, 2], [1]]})
    torch.testing.assert_close(group[:, 0], expected[:, 0] + expected[:, 2], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(group[:, 1], expected[:, 1], rtol=1e-12, atol=1e-14)
    tensor_ids = tx.lrp(fn, params, x, target, composite="epsilon_plus", epsilon=eps,
                        condition={"0": torch.tensor([2, 0])})
    torch.testing.assert_close(tensor_ids, expected[:, [2, 0]], rtol=1e-12, atol=1e-14)


def _torchvision(arch, zero_shifts):
    return torchvision_lrp_model(arch, zero_shifts=zero_shifts)


def _zennit_at_layer(model, x, target, layer):
    """zennit 0.5.1's relevance at a layer's output: a forward hook keeps the output, retain_grad reads it."""
    composites = pytest.importorskip("zennit.composites")
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizer = ResNetCanonizer() if hasattr(model, "layer1") else VGGCanonizer()
    comp = composites.EpsilonPlusFlat(canonizers=[canonizer])
    kept = {}

    def keep(module, args, output):
        output.retain_grad()
        kept["out"] = output

    xx = x.clone().requires_grad_(True)
    with comp.context(model) as m:
        handle = dict(m.named_modules())[layer].register_forward_hook(keep)  # after zennit's hooks
        try:
            out = m(xx)
            seed = torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None]))
            out.backward(seed)
        finally:
            handle.remove()
    return kept["out"].grad, xx.grad


@pytest.mark.parametrize("arch,layers", [("vgg11", ["features.5", "features.15"]),
                                         ("resnet18", ["layer1", "layer3"])])
def test_layer_relevance_equals_zennit_and_conserves(arch, layers):
    """Zero biases and batch-norm shifts: z-plus, flat, epsilon and the residual split conserve, so the
    relevance at a layer every path passes through sums to the input relevance's sum and to the target
    logit (float64, 1e-9 relative). With biases they do not conserve (the merged batch norms of vgg11_bn and resnet18
    put 10-30 % more relevance at features.8 / layer2 than at the input: tests/composite/test_concepts.py)."""
    model = _torchvision(arch, zero_shifts=True)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    heat = tx.lrp(fn, params, x, target)
    for layer in layers:
        ours = tx.lrp(fn, params, x, target, layer=layer)
        ref, ref_input = _zennit_at_layer(model, x, target, layer)
        assert ours.shape == ref.shape
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, (layer, err)  # measured <= 1e-6
        torch.testing.assert_close(heat, ref_input, rtol=0, atol=1e-5 * ref_input.abs().max().item())
    # conservation, in float64 with stabilisers that do not show (in float32 the sums, small after
    # cancellation, agree to ~1e-5 relative)
    fn, params = tx.functionalize(model.double())
    x, tiny = x.double(), {"epsilon": 1e-12, "stabilizer": 1e-12}
    total = tx.lrp(fn, params, x, target, **tiny).flatten(1).sum(1)
    torch.testing.assert_close(total, fn(params, x).gather(1, target[:, None])[:, 0], rtol=1e-9, atol=0)
    for layer in layers:
        at_layer = tx.lrp(fn, params, x, target, layer=layer, **tiny).flatten(1).sum(1)
        torch.testing.assert_close(at_layer, total, rtol=1e-9, atol=0)


@pytest.mark.parametrize("arch,layer", [("vgg11", "features.5"), ("resnet18", "layer2")])
def test_concepts_of_all_channels_sum_to_the_heatmap(arch, layer):
    """Every path from input to output passes through these layers: the K = C concept heatmaps
    (one batched call) sum to the unconditioned heatmap."""
    model = _torchvision(arch, zero_shifts=False)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([4, 7])
    heat = tx.lrp(fn, params, x, target)
    channels = tx.lrp(fn, params, x, target, layer=layer).shape[1]
    concepts = tx.lrp(fn, params, x, target, condition={layer: list(range(channels))})
    assert concepts.shape == (2, channels, 3, 32, 32)
    err = ((concepts.sum(1) - heat).abs().max() / heat.abs().max()).item()
    assert err <= 1e-5, err  # measured ~1e-7
    # one concept equals its row of the batched call
    torch.testing.assert_close(tx.lrp(fn, params, x, target, condition={layer: 5}), concepts[:, 5],
                               rtol=0, atol=1e-6 * heat.abs().max().item())


def test_concepts_at_a_layer_inside_a_residual_block_leave_out_the_bypass():
    """layer2.0.conv1 is skipped by the block's shortcut: the concepts sum to what passed through it,
    i.e. the heatmap minus the shortcut's share, which is not the whole heatmap (zennit-crp's
    exclude_parallel=True)."""
    model = _torchvision("resnet18", zero_shifts=False)
    fn, params = tx.functionalize(model)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    heat = tx.lrp(fn, params, x, 2)
    layer = "layer2.0.conv1"
    channels = 128
    concepts = tx.lrp(fn, params, x, 2, condition={layer: list(range(channels))})
    everything = tx.lrp(fn, params, x, 2, condition={layer: [list(range(channels))]})
    torch.testing.assert_close(concepts.sum(1), everything[:, 0], rtol=0, atol=1e-6 * heat.abs().max().item())
    assert (everything[:, 0] - heat).abs().max() > 0.01 * heat.abs().max()


def test_layer_relevance_is_differentiable_wrt_params():
    """gradcheck (float64) of a loss on the relevance at a layer and on a concept heatmap w.r.t. a weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = params["2.weight"].detach().clone().requires_grad_(True)

    def loss(w):
        p = {**params, "2.weight": w}
        at_layer = tx.lrp(fn, p, x, 1, composite="epsilon_plus", layer="1")
        concept = tx.lrp(fn, p, x, 1, composite="epsilon_plus", condition={"0": [0, 2]})
        return (at_layer ** 2).sum() + (concept ** 2).sum()

    assert torch.autograd.gradcheck(loss, (w,), eps=1e-6, atol=1e-6)


def test_errors_and_model_untouched():
    model = _two_layer()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="lrp: expected layer= or condition=, not both"):
        tx.lrp(fn, params, x, 0, layer="0", condition={"0": 1})
    with pytest.raises(ValueError, match="exactly one layer"):
        tx.lrp(fn, params, x, 0, condition={"0": 1, "2": 0})
    with pytest.raises(ValueError, match=r"channel ids in condition in \[0, 3\).*got 3"):
        tx.lrp(fn, params, x, 0, condition={"0": [0, 3]})
    with pytest.raises(TypeError, match="channel ids in condition"):
        tx.lrp(fn, params, x, 0, condition={"0": 1.5})
    with pytest.raises(TypeError, match="channel ids in condition"):
        tx.lrp(fn, params, x, 0, condition={"0": []})
    with pytest.raises(ValueError, match="non-empty channel groups"):
        tx.lrp(fn, params, x, 0, condition={"0": [[0], []]})
    with pytest.raises(TypeError, match="condition, a dict"):
        tx.lrp(fn, params, x, 0, condition=["0", 1])
    with pytest.raises(ValueError, match="layer"):
        tx.lrp(fn, params, x, 0, layer="nope")
    with pytest.raises(TypeError, match="one layer"):
        tx.lrp(fn, params, x, 0, layer=["0", "2"])
    tx.lrp(fn, params, x, 0, layer=model[1])   # a module is accepted
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tx.lrp(fn, params, x, 0, condition={model[0]: [0, 1]})
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_vmap_over_examples_equals_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for options in ({"layer": "1"}, {"condition": {"0": [0, [1, 2]]}}):
        batch = tx.lrp(fn, params, x, 1, composite="epsilon_plus", **options)
        def one(xi, options=options):
            return tx.lrp(fn, params, xi[None], 1, composite="epsilon_plus", **options)[0]

        mapped = torch.func.vmap(one)(x)
        torch.testing.assert_close(mapped, batch, rtol=1e-12, atol=1e-15)
        assert batch.abs().max() > 0
