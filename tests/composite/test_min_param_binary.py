"""tx.robust.min_param_perturbation(mode="binary"): captum's binary search, per example.

* equal to captum 0.9's MinParamPerturbation(mode="binary") example by example (FGSM on a small MLP; a random
  attack with several attempts under the same seed), on a grid whose steps are exact in floats;
* a closed form: on a linear model pushed along a fixed direction the class flips at a known value, and the
  bisection finds the first grid value past it for every example of a batch, in about log2(len(values))
  attack calls;
* refused under vmap, for values not ascending and for an unknown mode.
"""
import math

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.parity import assert_no_hooks

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]

robust = pytest.importorskip("captum.robust")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


STEP = 0.125
VALUES = [k * STEP for k in range(32)]   # captum: arg_min 0, arg_max 4, arg_step 0.125


def _check_against_captum(ours, x, searcher, target, reseed=None):
    for i in range(x.shape[0]):
        if reseed is not None:
            torch.manual_seed(reseed + i)
        perturbed, value = searcher.evaluate(x[i:i + 1], target=target[i:i + 1])
        if value is None:
            assert not ours.found[i] and math.isnan(ours.value[i]) and torch.equal(ours.perturbed[i], x[i])
        else:
            assert ours.found[i] and ours.value[i].item() == value, (i, ours.value[i].item(), value)
            torch.testing.assert_close(ours.perturbed[i:i + 1], perturbed, rtol=0, atol=0)


def test_fgsm_equals_captums_binary_search_per_example():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = 2.0 * _randn(8, 6)
    y = model(x).argmax(1)

    def fgsm_attack(inputs, eps):
        return tx.robust.fgsm(fn, params, inputs, None, epsilon=eps)

    ours = tx.robust.min_param_perturbation(fn, params, x, y, attack=fgsm_attack, values=VALUES, mode="binary")
    searcher = robust.MinParamPerturbation(model, fgsm_attack, "eps", 0.0, 4.0, STEP, mode="binary")
    _check_against_captum(ours, x, searcher, y)
    assert ours.found.sum() >= 4 and ours.value[ours.found].unique().numel() >= 3   # not one answer for all
    assert_no_hooks(model)


def test_a_random_attack_with_attempts_equals_captum_under_the_same_seed():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(4, 6)
    y = model(x).argmax(1)

    def noise(inputs, std):
        return inputs + std * torch.randn_like(inputs)

    searcher = robust.MinParamPerturbation(model, noise, "std", 0.0, 4.0, STEP, mode="binary", num_attempts=3)
    for i in range(x.shape[0]):   # one example at a time: the draws are then the same calls in the same order
        torch.manual_seed(10 + i)
        ours = tx.robust.min_param_perturbation(fn, params, x[i:i + 1], y[i:i + 1], attack=noise, values=VALUES,
                                                num_attempts=3, mode="binary")
        torch.manual_seed(10 + i)
        perturbed, value = searcher.evaluate(x[i:i + 1], target=y[i:i + 1])
        assert value is not None and ours.found.item() and ours.value.item() == value
        torch.testing.assert_close(ours.perturbed, perturbed, rtol=0, atol=0)


def test_closed_form_on_a_linear_model_and_the_number_of_attack_calls():
    # logits (z, 0) with z = w . x: class 0 while w . x > 0. Pushing along -w / |w|^2 by t lowers z by t, so the
    # model turns wrong (argmax 1) once t > z0: the first grid value past z0 (none of them on the grid).
    model = nn.Linear(3, 2, bias=False).eval()
    w = torch.tensor([1.0, -2.0, 0.5])
    with torch.no_grad():
        model.weight.copy_(torch.stack([w, torch.zeros(3)]))
    fn, params = tx.functionalize(model)
    z0 = torch.tensor([0.3, 1.01, 2.51, 3.7, 0.05])
    x = z0[:, None] * w / w.dot(w)
    calls = []

    def push(inputs, t):
        calls.append(t)
        return inputs - t * w / w.dot(w)

    got = tx.robust.min_param_perturbation(fn, params, x, 0, attack=push, values=VALUES, mode="binary")
    expected = torch.tensor([math.ceil(v / STEP) * STEP for v in z0.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.value, expected, rtol=0, atol=1e-12)
    assert got.found.all()
    linear = tx.robust.min_param_perturbation(fn, params, x, 0, attack=push, values=VALUES)
    torch.testing.assert_close(got.value, linear.value)
    # one example: a bisection of 32 positions, at most 6 calls (a linear scan: up to 32)
    calls.clear()
    one = tx.robust.min_param_perturbation(fn, params, x[2:3], 0, attack=push, values=VALUES, mode="binary")
    assert one.value.item() == 2.625 and len(calls) <= 6
    # none broken within the grid: found False, NaN, the input itself
    x_far = (5.0 * w / w.dot(w))[None]   # z0 = 5, past the grid's last value 3.875
    far = tx.robust.min_param_perturbation(fn, params, x_far, 0, attack=push, values=VALUES, mode="binary")
    assert not far.found.item() and math.isnan(far.value.item()) and torch.equal(far.perturbed, x_far)


def test_bad_input_and_vmap_are_refused():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(3, 6)
    attack = lambda z, e: z + e   # noqa: E731
    with pytest.raises(ValueError, match=r"^robust.min_param_perturbation: expected values in strictly ascending "):
        tx.robust.min_param_perturbation(fn, params, x, 0, attack=attack, values=[0.0, 0.5, 0.5], mode="binary")
    with pytest.raises(ValueError, match=r"^robust.min_param_perturbation: .*mode"):
        tx.robust.min_param_perturbation(fn, params, x, 0, attack=attack, values=[0.0], mode="bisect")
    with pytest.raises(TypeError, match=r"^robust.min_param_perturbation: expected mode"):
        tx.robust.min_param_perturbation(fn, params, x, 0, attack=attack, values=[0.0], mode=1)
    with pytest.raises(ValueError, match=r"^robust.min_param_perturbation: expected mode='linear' under "
                                         r"torch.func.vmap"):
        torch.func.vmap(lambda xi: tx.robust.min_param_perturbation(fn, params, xi, 0, attack=attack,
                                                                    values=[0.0, 1.0], mode="binary").value)(x[:, None])
    # the linear mode runs under vmap
    torch.func.vmap(lambda xi: tx.robust.min_param_perturbation(fn, params, xi, 0, attack=attack,
                                                                values=[0.0, 1.0]).value)(x[:, None])
    assert_no_hooks(model)
