"""tx.robust: fgsm, pgd, min_param_perturbation, attack_comparator.

* closed forms on a hand-weighted two-class linear model, where the cross-entropy gradient of class 0 is
  p_1 (W_1 - W_0) (its direction does not depend on x): an FGSM step is x + eps sign(W_1 - W_0) (the zero
  entry does not move), an L2 step x + eps u with u = (W_1 - W_0) / |W_1 - W_0|; k PGD steps of size a in a
  ball of radius r give min(k a, r) sign(...) (L-infinity) and min(k a, r) u (L2);
* captum 0.9's L2 PGD takes sign steps and only rescales onto the ball: its answer is min(k a sqrt(2), r)
  (-1, 1, 0) / sqrt(2) here, ours the standard min(k a, r) u;
* parity with captum's FGSM and PGD (L-infinity; random start from the same seed) on a small MLP and a randomly
  initialised resnet18, with bounds, masks, targeted attacks and captum's default -log loss: equal to 1e-5;
* min_param_perturbation equals captum's MinParamPerturbation (linear search) example by example;
  attack_comparator equals captum's AttackComparator.evaluate (mean, min, max over attempts);
* vmap over an ensemble == the loop; bad input is refused by name; the model keeps no hook.
"""
import math

import pytest
import torch
from torch import nn

import torchex_fn as tx
from support.parity import assert_no_hooks, peer_input, peer_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]

W = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, 0.5]])   # W_1 - W_0 = (-3, 2, 0)
SIGN = torch.tensor([-1.0, 1.0, 0.0])
UNIT = torch.tensor([-3.0, 2.0, 0.0]) / math.sqrt(13.0)


def _linear():
    model = nn.Linear(3, 2).eval()
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(torch.tensor([0.3, -0.2]))
    return model


def _mlp(seed=0, softmax=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)] + ([nn.Softmax(-1)] if softmax else [])
    return nn.Sequential(*layers).eval()


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X = torch.tensor([[0.1, -0.2, 0.3], [1.0, 2.0, -1.0]])


# ------------------------------------------------------------------------------------------ closed forms

def test_fgsm_step_closed_form_on_a_linear_model():
    fn, params = tx.functionalize(_linear())
    zero = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(tx.robust.fgsm(fn, params, X, zero, epsilon=0.25), X + 0.25 * SIGN)
    # towards class 1: descend its loss, whose gradient is p_0 (W_0 - W_1): the same move
    torch.testing.assert_close(tx.robust.fgsm(fn, params, X, 1, epsilon=0.25, targeted=True), X + 0.25 * SIGN)
    torch.testing.assert_close(tx.robust.fgsm(fn, params, X, 1, epsilon=0.25), X - 0.25 * SIGN)
    torch.testing.assert_close(tx.robust.fgsm(fn, params, X, zero, epsilon=0.25, norm="L2"), X + 0.25 * UNIT)
    bounded = tx.robust.fgsm(fn, params, X, zero, epsilon=0.25, lower_bound=-0.1, upper_bound=1.5)
    torch.testing.assert_close(bounded, (X + 0.25 * SIGN).clamp(-0.1, 1.5))
    masked = tx.robust.fgsm(fn, params, X, zero, epsilon=0.25, mask=torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(masked, X + 0.25 * torch.tensor([-1.0, 0.0, 0.0]))
    # a loss of one's own: the class-0 logit's increase moves along sign(W_0)
    up = tx.robust.fgsm(fn, params, X, None, epsilon=0.1, loss=lambda out, t: out[:, 0])
    torch.testing.assert_close(up, X + 0.1 * W[0].sign())


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pgd_steps_closed_form_on_a_linear_model(steps):
    fn, params = tx.functionalize(_linear())
    zero = torch.zeros(2, dtype=torch.long)
    size, radius = 0.3, 0.5
    linf = tx.robust.pgd(fn, params, X, zero, radius=radius, step_size=size, step_num=steps)
    torch.testing.assert_close(linf, X + min(steps * size, radius) * SIGN)
    l2 = tx.robust.pgd(fn, params, X, zero, radius=radius, step_size=size, step_num=steps, norm="L2")
    torch.testing.assert_close(l2, X + min(steps * size, radius) * UNIT)
    assert float((l2 - X).norm(dim=1).max()) <= radius + 1e-6


def test_captum_l2_pgd_takes_sign_steps_ours_steps_along_the_gradient():
    robust = pytest.importorskip("captum.robust")
    model = _linear()
    fn, params = tx.functionalize(model)
    zero = torch.zeros(2, dtype=torch.long)
    ce = nn.CrossEntropyLoss(reduction="none")
    size, radius = 0.3, 0.5
    for steps in (1, 2):
        theirs = robust.PGD(model, ce).perturb(X, radius, size, steps, zero, norm="L2")
        ours = tx.robust.pgd(fn, params, X, zero, radius=radius, step_size=size, step_num=steps, norm="L2")
        # captum: k sign steps (-1, 1, 0) of length a sqrt(2) each, rescaled to the radius when longer
        sign_steps = min(steps * size * math.sqrt(2.0), radius) * SIGN / math.sqrt(2.0)
        torch.testing.assert_close(theirs, X + sign_steps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, X + min(steps * size, radius) * UNIT)
        assert (theirs - ours).abs().max() > 0.05
    # one step of the same L2 length: ours gains more loss (the steepest ascent direction in L2)
    loss = lambda z: ce(model(z), zero)   # noqa: E731
    sign_step = X + size * SIGN / math.sqrt(2.0)
    ours = tx.robust.pgd(fn, params, X, zero, radius=radius, step_size=size, step_num=1, norm="L2")
    assert (loss(ours) > loss(sign_step)).all()


def test_l2_random_start_is_uniform_in_each_example_ball_where_captum_fails():
    """captum multiplies the per-example radii [B] into the input's last axis: [5, 6] inputs fail there. Ours
    draws a Gaussian direction and a radius r U^(1/d) per example, in captum's order of draws."""
    robust = pytest.importorskip("captum.robust")
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, y = _randn(5, 6), torch.zeros(5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="must match the size"):
        robust.PGD(model, nn.CrossEntropyLoss(reduction="none")).perturb(x, 0.3, 0.01, 1, y, norm="L2",
                                                                         random_start=True)
    start = tx.robust.pgd(fn, params, x, y, radius=0.3, step_size=1e-9, step_num=1, norm="L2", random_start=True,
                          generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    gauss = torch.randn(5, 6, generator=g)
    radii = torch.rand(5, generator=g) ** (1 / 6) * 0.3
    torch.testing.assert_close(start, x + radii[:, None] * gauss / gauss.norm(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------------------ captum

CASES = [  # (our options, captum constructor options, captum perturb options)
    ({}, {}, {}),
    ({"lower_bound": -0.5, "upper_bound": 0.8}, {"lower_bound": -0.5, "upper_bound": 0.8}, {}),
    ({"targeted": True}, {}, {"targeted": True}),
    ({"mask": (torch.arange(6) % 2).float()}, {}, {"mask": (torch.arange(6) % 2).float().expand(5, 6)}),
]


@pytest.mark.parametrize("ours_opts, init, extra", CASES)
def test_fgsm_and_pgd_equal_captum_on_an_mlp(ours_opts, init, extra):
    robust = pytest.importorskip("captum.robust")
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, y = _randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    ce = nn.CrossEntropyLoss(reduction="none")
    ours = tx.robust.fgsm(fn, params, x, y, epsilon=0.2, **ours_opts)
    theirs = robust.FGSM(model, ce, **init).perturb(x, 0.2, y, **extra)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours - x).abs().max() > 0.1
    for random_start in (False, True):
        torch.manual_seed(5)
        theirs = robust.PGD(model, ce, **init).perturb(x, 0.3, 0.07, 6, y, random_start=random_start, **extra)
        ours = tx.robust.pgd(fn, params, x, y, radius=0.3, step_size=0.07, step_num=6, random_start=random_start,
                             generator=torch.Generator().manual_seed(5), **ours_opts)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert_no_hooks(model)


def test_captum_default_loss_is_neg_log():
    robust = pytest.importorskip("captum.robust")
    model = _mlp(softmax=True)
    fn, params = tx.functionalize(model)
    x, y = _randn(5, 6), torch.tensor([2, 1, 0, 0, 1])
    theirs = robust.PGD(model).perturb(x, 0.4, 0.1, 5, y)
    ours = tx.robust.pgd(fn, params, x, y, radius=0.4, step_size=0.1, step_num=5, loss="neg_log")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours - x).abs().max() > 0.3


def test_fgsm_and_pgd_equal_captum_on_resnet18():
    robust = pytest.importorskip("captum.robust")
    model, fn, params = peer_model("resnet18")
    x = peer_input()
    y = torch.tensor([3, 7, 1])
    ce = nn.CrossEntropyLoss(reduction="none")
    ours = tx.robust.fgsm(fn, params, x, y, epsilon=0.05, lower_bound=-2.0, upper_bound=2.0)
    theirs = robust.FGSM(model, ce, lower_bound=-2.0, upper_bound=2.0).perturb(x, 0.05, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.manual_seed(11)
    theirs = robust.PGD(model, ce).perturb(x, 0.03, 0.01, 3, y, random_start=True)
    ours = tx.robust.pgd(fn, params, x, y, radius=0.03, step_size=0.01, step_num=3, random_start=True,
                         generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert_no_hooks(model)


def _drange(low, high, step):   # captum's grid: low, low + step, ... (accumulated) while < high
    values, current = [], low
    while current < high:
        values.append(current)
        current += step
    return values


def test_min_param_perturbation_equals_captum_per_example():
    metrics = pytest.importorskip("captum.robust")
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(6, 6)
    y = model(x).argmax(1)                                         # correct at value 0

    def fgsm_attack(inputs, eps):                                       # FGSM away from the predicted class
        return tx.robust.fgsm(fn, params, inputs, None, epsilon=eps)

    values = _drange(0.0, 3.0, 0.1)
    ours = tx.robust.min_param_perturbation(fn, params, x, y, attack=fgsm_attack, values=values)
    searcher = metrics.MinParamPerturbation(model, fgsm_attack, "eps", 0.0, 3.0, 0.1)
    for i in range(x.shape[0]):
        perturbed, value = searcher.evaluate(x[i:i + 1], target=y[i:i + 1])
        if value is None:
            assert not ours.found[i] and math.isnan(ours.value[i]) and torch.equal(ours.perturbed[i], x[i])
        else:
            assert ours.found[i] and ours.value[i].item() == value
            torch.testing.assert_close(ours.perturbed[i:i + 1], perturbed)
    assert ours.found.sum() >= 3 and ours.value[ours.found].unique().numel() >= 2   # not one answer for all


def test_attack_comparator_equals_captum():
    robust = pytest.importorskip("captum.robust")
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(6, 6)
    y = model(x).argmax(1)

    def metric(out, target):
        return torch.softmax(out, -1).gather(1, target[:, None])[:, 0]

    def make_attacks():
        g = torch.Generator().manual_seed(3)
        return {"shift": lambda z: z + 0.4, "noise": lambda z: z + torch.randn(z.shape, generator=g)}

    attacks = make_attacks()
    comparator = robust.AttackComparator(model, metric)
    comparator.add_attack(attacks["shift"], "shift")
    comparator.add_attack(attacks["noise"], "noise", num_attempts=4)
    theirs = comparator.evaluate(x, target=y)
    ours = tx.robust.attack_comparator(fn, params, x, y, attacks=make_attacks(), metric=metric,
                                       num_attempts={"noise": 4})
    assert set(ours) == set(theirs) == {"Original", "shift", "noise"}
    torch.testing.assert_close(ours["Original"], theirs["Original"])
    assert set(ours["shift"]) == {"mean"} and set(ours["noise"]) == {"mean", "min", "max"} == set(theirs["noise"])
    torch.testing.assert_close(ours["shift"]["mean"], theirs["shift"]["mean"])
    for key in ("mean", "min", "max"):
        torch.testing.assert_close(ours["noise"][key], theirs["noise"][key], rtol=1e-5, atol=1e-6)
    assert (ours["noise"]["max"] - ours["noise"]["min"]).max() > 0.05
    default = tx.robust.attack_comparator(fn, params, x, y, attacks={"shift": lambda z: z + 3.0})
    torch.testing.assert_close(default["Original"], torch.ones(6))
    torch.testing.assert_close(default["shift"]["mean"], (model(x + 3.0).argmax(1) == y).float())


# ----------------------------------------------------------------------------------------- vmap, errors

def test_vmap_over_an_ensemble_equals_the_loop():
    models = [_mlp(seed=s) for s in range(3)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x, y = _randn(4, 6), torch.tensor([0, 1, 2, 1])

    def run(p):
        one = tx.robust.fgsm(fn, p, x, y, epsilon=0.1, norm="L2")
        many = tx.robust.pgd(fn, p, x, y, radius=0.3, step_size=0.1, step_num=4, lower_bound=-1.5, upper_bound=1.5)
        attack = lambda z, e: z + e   # noqa: E731
        least = tx.robust.min_param_perturbation(fn, p, x, None, attack=attack, values=[0.0, 0.5, 1.0, 2.0, 4.0])
        return one, many, least.value, least.perturbed

    stacked = torch.func.vmap(run)({**params, **buffers})
    loop = [run(tx.functionalize(m)[1]) for m in models]
    for k, got in enumerate(stacked):
        torch.testing.assert_close(got, torch.stack([row[k] for row in loop]), equal_nan=True)
    assert torch.isfinite(stacked[2]).any()


def test_bad_input_is_refused_by_name():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x, y = _randn(4, 6), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="robust.fgsm: expected norm 'Linf' or 'L2', got str 'L1'"):
        tx.robust.fgsm(fn, params, x, y, epsilon=0.1, norm="L1")
    with pytest.raises(ValueError, match="robust.fgsm: expected epsilon >= 0"):
        tx.robust.fgsm(fn, params, x, y, epsilon=-0.1)
    with pytest.raises(TypeError, match="robust.fgsm: expected x of a floating-point dtype"):
        tx.robust.fgsm(fn, params, x.long(), y, epsilon=0.1)
    with pytest.raises(ValueError, match="robust.fgsm: expected loss 'cross_entropy', 'neg_log' or a callable"):
        tx.robust.fgsm(fn, params, x, y, epsilon=0.1, loss="hinge")
    with pytest.raises(ValueError, match=r"robust.fgsm: expected mask broadcastable to x's shape \(4, 6\)"):
        tx.robust.fgsm(fn, params, x, y, epsilon=0.1, mask=torch.ones(5))
    with pytest.raises(ValueError, match="robust.pgd: expected radius > 0"):
        tx.robust.pgd(fn, params, x, y, radius=0.0, step_size=0.1, step_num=2)
    with pytest.raises(ValueError, match="robust.pgd: expected step_num >= 1"):
        tx.robust.pgd(fn, params, x, y, radius=0.1, step_size=0.1, step_num=0)
    with pytest.raises(ValueError, match="robust.pgd: expected lower_bound <= upper_bound"):
        tx.robust.pgd(fn, params, x, y, radius=0.1, step_size=0.1, step_num=1, lower_bound=1.0, upper_bound=0.0)
    with pytest.raises(TypeError, match="robust.pgd: expected generator, a torch.Generator"):
        tx.robust.pgd(fn, params, x, y, radius=0.1, step_size=0.1, step_num=1, random_start=True, generator=3)
    with pytest.raises(ValueError, match="robust.min_param_perturbation: expected at least one value"):
        tx.robust.min_param_perturbation(fn, params, x, y, attack=lambda z, e: z, values=[])
    with pytest.raises(ValueError, match=r"robust.min_param_perturbation: expected attack outputs of x's shape"):
        tx.robust.min_param_perturbation(fn, params, x, y, attack=lambda z, e: z[:2], values=[1.0])
    with pytest.raises(ValueError, match="robust.attack_comparator: expected attack names other than 'Original'"):
        tx.robust.attack_comparator(fn, params, x, y, attacks={"Original": lambda z: z})
    with pytest.raises(ValueError, match="robust.attack_comparator: expected num_attempts naming only the attacks"):
        tx.robust.attack_comparator(fn, params, x, y, attacks={"a": lambda z: z}, num_attempts={"b": 2})
    assert_no_hooks(model)
