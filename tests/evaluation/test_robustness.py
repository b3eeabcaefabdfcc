"""The robustness family of tx.metrics against computations written out here: fixed draws fed through
``perturb_func``, maps that are known functions of the input, translations done by hand; Quantus's departures
from the papers (continuity's ignored baseline, consistency's first-n-pixels label, the batch-wide
normalisation) each shown on numbers."""
import functools

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics
from torchex_fn.evaluation import robustness

from support.perturbations import Feed


def square_map(model_fn, params, x, target):
    """A 'method' whose map is a known function of the input: x^2 summed over channels, times the target + 1."""
    return (x ** 2).sum(1, keepdim=True) * (target.to(x.dtype) + 1).view(-1, 1, 1, 1)


def net(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 4, 3))
    return model.to(dtype).eval()


def setup(dtype=torch.float32):
    fn, params = tx.functionalize(net(dtype))
    x = torch.rand(3, 2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return fn, params, x


def prepared(m, normalise, absolute):
    flat = m.reshape(m.shape[0], -1)
    if normalise:
        flat = flat / flat.abs().amax(1, keepdim=True)
    return flat.abs() if absolute else flat


@pytest.mark.parametrize("batch_size", [3, 6, 64])
def test_avg_and_max_sensitivity_equal_a_loop_over_the_draws(batch_size):
    fn, params, x = setup()
    noise = 0.2 * (2 * torch.rand(7, *x.shape, generator=torch.Generator().manual_seed(2)) - 1)
    y = fn(params, x).argmax(1)
    ref = square_map(fn, params, x, y).flatten(1)
    ratios = torch.stack([(square_map(fn, params, x + d, y).flatten(1) - ref).norm(dim=1) / ref.norm(dim=1)
                          for d in noise])                                            # [7, B]
    avg = metrics.avg_sensitivity(square_map, fn, params, x, nr_samples=7, perturb_func=Feed(noise),
                                  batch_size=batch_size)
    top = metrics.max_sensitivity(square_map, fn, params, x, nr_samples=7, perturb_func=Feed(noise),
                                  batch_size=batch_size)
    torch.testing.assert_close(avg, ratios.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(top, ratios.amax(0), rtol=1e-6, atol=0)
    assert (top > avg).all() and (avg > 0).all()


def test_default_draw_is_uniform_in_the_bounds():
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(x.shape, generator=gen)
    by_hand = ((square_map(fn, params, x + 0.05 + (0.3 - 0.05) * u, y) - square_map(fn, params, x, y)).flatten(1)
               .norm(dim=1) / square_map(fn, params, x, y).flatten(1).norm(dim=1))
    ours = metrics.avg_sensitivity(square_map, fn, params, x, nr_samples=1, lower_bound=0.05, upper_bound=0.3,
                                   generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, by_hand, rtol=1e-6, atol=0)


def test_sensitivity_max_is_max_sensitivity_with_captums_convention():
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    old = metrics.sensitivity_max(lambda xx: square_map(fn, params, xx, y), x, perturb_radius=0.1,
                                  n_perturb_samples=5, generator=torch.Generator().manual_seed(4))
    new = metrics.max_sensitivity(square_map, fn, params, x, y, nr_samples=5, lower_bound=0.1,
                                  batch_size=x.shape[0], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(old, new, rtol=1e-5, atol=0)


def test_nan_when_a_draw_changes_the_prediction():
    fn, params, x = setup()
    pred = fn(params, x).argmax(1)
    noise = torch.zeros(2, *x.shape)
    noise[1, 1] = -5.0                    # a large push on example 1 only
    changed = fn(params, x + noise[1]).argmax(1) != pred
    assert changed.tolist() == [False, True, False]
    out = metrics.avg_sensitivity(square_map, fn, params, x, nr_samples=2, perturb_func=Feed(noise),
                                  return_nan_when_prediction_changes=True)
    assert out.isnan().tolist() == [False, True, False]
    plain = metrics.avg_sensitivity(square_map, fn, params, x, nr_samples=2, perturb_func=Feed(noise))
    assert not plain.isnan().any()


def test_local_lipschitz_estimate_by_hand():
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    gen = torch.Generator().manual_seed(5)
    draws = [x + 0.1 * torch.randn(x.shape, generator=gen) for _ in range(4)]
    ref = prepared(square_map(fn, params, x, y), True, False)
    by_hand = torch.stack([(prepared(square_map(fn, params, d, y), True, False) - ref).norm(dim=1)
                           / ((d - x).flatten(1).norm(dim=1) + 1e-10) for d in draws]).amax(0)
    ours = metrics.local_lipschitz_estimate(square_map, fn, params, x, nr_samples=4, batch_size=6,
                                            generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=0)


def shifted(img, d, fill):
    """Translation by hand, column by column: out[..., j] = img[..., j - d] where that exists, else fill."""
    out = torch.empty_like(img)
    width = img.shape[-1]
    for j in range(width):
        out[..., j] = img[..., j - d] if 0 <= j - d < width else fill
    return out


def identity_map(model_fn, params, x, target):
    return x.sum(1, keepdim=True)


@pytest.mark.parametrize("baseline", ["black", "white", 0.5])
def test_continuity_by_hand_and_the_baseline_is_honoured(baseline):
    fn, params, x = setup()
    width = x.shape[-1]                                      # 4: dx = 9 // 3 = 3, shifts -1, 2, 5 (clipped)
    values = []
    for i in range(3):
        xi = x[i:i + 1]
        fill = {"black": xi.min(), "white": xi.max()}.get(baseline, baseline)
        ref = prepared(identity_map(fn, params, xi, None), True, True)
        ratios = []
        for d in (-width + 3, -width + 6, -width + 9):
            moved = shifted(xi, d, fill)
            ratios.append((prepared(identity_map(fn, params, moved, None), True, True) - ref).abs().sum()
                          / ((moved - xi).norm() + 1e-9))
        values.append(max(ratios))
    ours = metrics.continuity(identity_map, fn, params, x, nr_steps=3, perturb_baseline=baseline, batch_size=4)
    torch.testing.assert_close(ours, torch.stack(values), rtol=1e-5, atol=0)


def test_continuity_baselines_differ_and_each_example_is_normalised_alone():
    # Quantus pads with the minimum whatever perturb_baseline says (test_robustness_parity shows its
    # 'white' equal to its 'black'); here they differ. An example's value does not depend on its batch.
    fn, params, x = setup()
    black = metrics.continuity(identity_map, fn, params, x, nr_steps=3)
    white = metrics.continuity(identity_map, fn, params, x, nr_steps=3, perturb_baseline="white")
    assert (black - white).abs().min() > 1e-3
    alone = torch.cat([metrics.continuity(identity_map, fn, params, x[i:i + 1], nr_steps=3) for i in range(3)])
    torch.testing.assert_close(black, alone, rtol=1e-6, atol=0)


def test_consistency_uses_the_largest_elements_not_the_first():
    # Quantus's top_n_sign keeps the signs of the first n elements: with abs (its default) every map gets
    # the same label, so consistency is just the share of examples with the same prediction.
    fn, params, x = setup()
    x = torch.cat([x, x[:1]])                                         # 4 examples; 0 and 3 the same input
    pred = fn(params, x).argmax(1)
    maps = torch.full((4, 1, 3, 4), 0.1)
    maps[0, 0, 2, 3] = maps[3, 0, 2, 3] = 1.0                          # 0 and 3: largest at the last pixel
    maps[1, 0, 1, 1] = maps[2, 0, 1, 1] = 1.0                          # 1 and 2: largest elsewhere
    ours = metrics.consistency(fn, params, x, maps, n=1)
    same_pred_12 = float(pred[1] == pred[2])
    torch.testing.assert_close(ours, torch.tensor([1.0, same_pred_12, same_pred_12, 1.0]), rtol=0, atol=1e-8)
    # Quantus's label, by hand: the signs of the first n = 1 elements, all +1 -> one label for all
    first = metrics.consistency(fn, params, x, maps, n=1, discretise_func=lambda a: a[:, :1].sign())
    by_hand = torch.tensor([float((pred[[j for j in range(4) if j != i]] == pred[i]).sum()) / 3 for i in range(4)])
    torch.testing.assert_close(first, by_hand, rtol=1e-6, atol=1e-8)


def test_top_n_sign_is_positions_and_signs():
    a = torch.tensor([[0.1, -3.0, 2.0, 0.0], [5.0, 0.0, 0.0, -5.0]])
    assert robustness.top_n_sign(a, 2).tolist() == [[1, 2, -1, 1], [0, 3, 1, -1]]


@pytest.mark.parametrize("name", ["input", "output", "representation"])
def test_relative_stabilities_by_hand(name):
    fn, params, x = setup()
    y = fn(params, x).argmax(1)
    noise = 0.02 + 0.01 * torch.rand(3, *x.shape, generator=torch.Generator().manual_seed(6))
    eps = 1e-6

    def rel(a, b):
        return (a - b) / torch.where(a == 0, torch.full_like(a, eps), a)

    e = square_map(fn, params, x, y).flatten(1)
    rows = []
    for d in noise:
        xs = x + d
        num = rel(e, square_map(fn, params, xs, y).flatten(1)).norm(dim=1)
        if name == "input":
            den = rel(x.flatten(1), xs.flatten(1)).norm(dim=1)
        elif name == "output":
            den = (fn(params, x) - fn(params, xs)).norm(dim=1)
        else:
            _, hx = tx.capture(fn, params, x, "1")
            _, hs = tx.capture(fn, params, xs, "1")
            den = rel(hx.flatten(1), hs.flatten(1)).norm(dim=1)
        rows.append(num / den)
    by_hand = torch.stack(rows).amax(0)
    function = getattr(metrics, f"relative_{name}_stability")
    extra = {"layer": "1"} if name == "representation" else {}
    ours = function(square_map, fn, params, x, nr_samples=3, perturb_func=Feed(noise), **extra)
    torch.testing.assert_close(ours.detach(), by_hand.detach(), rtol=1e-5, atol=0)


def test_representation_default_is_every_leaf_module():
    fn, params, x = setup()
    noise = 0.02 + 0.01 * torch.rand(2, *x.shape, generator=torch.Generator().manual_seed(8))
    default = metrics.relative_representation_stability(square_map, fn, params, x, nr_samples=2,
                                                        perturb_func=Feed(noise))
    listed = metrics.relative_representation_stability(square_map, fn, params, x, nr_samples=2,
                                                       perturb_func=Feed(noise), layer=["0", "1", "2", "3"])
    one = metrics.relative_representation_stability(square_map, fn, params, x, nr_samples=2,
                                                    perturb_func=Feed(noise), layer="1")
    torch.testing.assert_close(default, listed, rtol=1e-6, atol=0)
    assert not torch.allclose(default, one)


def test_gradcheck_avg_sensitivity_wrt_params():
    fn, params, x = setup(torch.float64)
    noise = 0.05 * torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = fn(params, x).argmax(1)
    names = ["0.bias", "3.bias"]                  # small tensors: the check differentiates once per element

    def score(*tensors):
        p = {**params, **dict(zip(names, tensors))}
        return metrics.avg_sensitivity(tx.saliency, fn, p, x, y, nr_samples=2, perturb_func=Feed(noise))

    inputs = tuple(params[k].detach().clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(score, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_vmap_over_an_ensemble_equals_a_loop():
    fn, params, x = setup()
    models = [net() for _ in range(3)]
    for k, m in enumerate(models):
        torch.manual_seed(10 + k)
        for p in m.parameters():
            p.data.normal_(0, 0.3)
    stacked = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k in params}
    y = torch.tensor([0, 1, 2])
    noise = 0.1 * torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(11))
    method = functools.partial(tx.saliency)

    def one(p):
        return metrics.avg_sensitivity(method, fn, p, x, y, nr_samples=3, perturb_func=Feed(noise))

    looped = torch.stack([one({k: v[i] for k, v in stacked.items()}) for i in range(3)])
    mapped = torch.func.vmap(one)(stacked)
    torch.testing.assert_close(mapped, looped, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_named():
    fn, params, x = setup()
    with pytest.raises(TypeError, match="avg_sensitivity.*method"):
        metrics.avg_sensitivity("saliency", fn, params, x)
    with pytest.raises(ValueError, match="max_sensitivity.*nr_samples"):
        metrics.max_sensitivity(square_map, fn, params, x, nr_samples=0)
    with pytest.raises(ValueError, match="continuity.*nr_steps"):
        metrics.continuity(square_map, fn, params, x, nr_steps=10)
    with pytest.raises(ValueError, match="continuity.*perturb_baseline"):
        metrics.continuity(square_map, fn, params, x, nr_steps=3, perturb_baseline="grey")
    with pytest.raises(ValueError, match="local_lipschitz_estimate.*perturb_func"):
        metrics.local_lipschitz_estimate(square_map, fn, params, x, nr_samples=1, perturb_func=lambda xx, g: xx[0])
    with pytest.raises(ValueError, match="relative_input_stability.*upper_bound"):
        metrics.relative_input_stability(square_map, fn, params, x, upper_bound="high")
