"""DeepLIFT (Rescale rule): captum parity, completeness, derivatives, vmap, purity, errors."""
import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import has_torch_function

import torchex_fn as tx
from torchex_fn.core import intercept
from torchex_fn.methods.propagation import deeplift, deeplift_shap

with warnings.catch_warnings():  # captum's import warns about torch.jit.script under recent torch
    warnings.simplefilter("ignore")
    from captum.attr import DeepLift as CaptumDeepLift


pytestmark = pytest.mark.usefixtures("one_thread")


def captum_deeplift(model, x, baseline, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum warns that it sets hooks
        return CaptumDeepLift(model).attribute(x, baselines=baseline, target=target)


def score(model, x, target):
    return model(x).gather(1, target[:, None])[:, 0]


def assert_complete(model, attr, x, baseline, target, atol=1e-4):
    """Completeness: the map sums to f(x) - f(baseline) for every example."""
    with torch.no_grad():
        delta = score(model, x, target) - score(model, torch.broadcast_to(baseline, x.shape), target)
    torch.testing.assert_close(attr.flatten(1).sum(1), delta, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------
# Models. Default initialisation gives non-zero biases everywhere.

def conv_net(act=nn.ReLU):
    """Each nonlinearity module used once, a conv between the ReLU and the MaxPool: captum is right."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act(), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 8), act(), nn.Linear(8, 5)).eval()


class SoftmaxNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.Softmax(dim=1))


class Reused(nn.Module):
    """One ReLU module called three times (captum raises), the second in place."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc1, self.fc2 = nn.Linear(256, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        h = self.relu(self.conv2(h) + h)
        return self.fc2(self.relu(self.fc1(h.flatten(1))))


class Functional(nn.Module):
    """Nonlinearities written as functions and methods inside forward (invisible to module hooks)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 8), nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h, _ = F.max_pool2d(torch.sigmoid(self.conv2(h)), 2, return_indices=True)
        h = self.fc1(h.flatten(1)).relu()
        return self.fc2(torch.tanh(h) + F.leaky_relu(h, 0.2))


class VGGish(nn.Module):
    """ReLU feeding MaxPool directly, as in VGG; ReLUs in place, one called through torch.relu_."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(torch.relu_(self.features(x).flatten(1)))


class Pool1d(nn.Module):
    """Overlapping and adaptive 1-d max pooling."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = F.max_pool1d(F.elu(self.conv1(x)), 3, stride=2, padding=1)
        return self.fc(F.adaptive_max_pool1d(F.gelu(self.conv2(h)), 3).flatten(1))


def mlp(act, d=6):
    return nn.Sequential(nn.Linear(d, 7), act(), nn.Linear(7, 7), act(), nn.Linear(7, 5)).eval()


# --------------------------------------------------------------------------------------------
# (a) captum parity where captum is right.

@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softplus])
@pytest.mark.parametrize("kind", ["tensor", "float"])
def test_equals_captum(act, kind):
    model = conv_net(act)
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8)
    baseline = 0.5 * torch.randn(3, 3, 8, 8) if kind == "tensor" else 0.3
    target = torch.tensor([0, 2, 4])
    ours = deeplift(fn, params, x, target, baseline=baseline)
    theirs = captum_deeplift(model, x, baseline, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert ours.abs().max() > 1e-3


def test_softmax_equals_captum_per_example():
    # softmax="captum" reproduces captum's (non-conserving) rule; captum centres its multipliers over
    # the whole batch, we centre per example (= captum at B=1)
    model = SoftmaxNet().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(3, 6), 0.5 * torch.randn(3, 6)
    target = torch.tensor([0, 3, 1])
    ours = deeplift(fn, params, x, target, baseline=baseline, softmax="captum")
    for i in range(3):
        theirs = captum_deeplift(model, x[i:i + 1], baseline[i:i + 1], target[i:i + 1])
        torch.testing.assert_close(ours[i:i + 1], theirs, rtol=1e-5, atol=1e-7)
    loop = torch.cat([deeplift(fn, params, x[i:i + 1], target[i:i + 1], baseline=baseline[i:i + 1], softmax="captum")
                      for i in range(3)])
    torch.testing.assert_close(ours, loop)


def test_softmax_conserves_by_default_and_captums_rule_does_not():
    model = SoftmaxNet().double().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(3, 6, dtype=torch.float64), 0.5 * torch.randn(3, 6, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    assert_complete(model, deeplift(fn, params, x, target, baseline=baseline), x, baseline, target, atol=1e-12)
    with pytest.raises(AssertionError):
        assert_complete(model, deeplift(fn, params, x, target, baseline=baseline, softmax="captum"), x, baseline,
                        target, atol=1e-4)


def _fixed_linear(weight):
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


@pytest.mark.parametrize("head", ["maxpool", "softmax"])
def test_equal_differences_in_pool_and_softmax_follow_captum(head):
    # For x = [2, 2] and a zero baseline, unit 0 (x1 - x2) is 0 in both passes (|dz| < eps): the rules
    # fall back to the ordinary gradient there. Max pooling: the input's arg-max is unit 0 and the
    # baseline's arg-max ties at 0, so by hand the map is [2 w, -2 w] with w the head's weight.
    if head == "maxpool":
        model = nn.Sequential(_fixed_linear([[1.0, -1.0], [-1.0, -1.0]]), nn.Unflatten(1, (1, 2)), nn.MaxPool1d(2),
                              nn.Flatten(), nn.Linear(1, 2)).eval()
    else:
        model = nn.Sequential(_fixed_linear([[1.0, -1.0], [1.0, 1.0]]), nn.Softmax(dim=1)).eval()
    fn, params = tx.functionalize(model)
    x, baseline, target = torch.tensor([[2.0, 2.0]]), torch.zeros(1, 2), torch.tensor([1])
    ours = deeplift(fn, params, x, target, baseline=baseline, softmax="captum")
    torch.testing.assert_close(ours, captum_deeplift(model, x, baseline, target), rtol=1e-5, atol=1e-7)
    if head == "maxpool":
        w = model[4].weight[1, 0].item()
        torch.testing.assert_close(ours, torch.tensor([[2 * w, -2 * w]]))
    assert ours.abs().max() > 1e-2


def test_captum_backend_equals_native():
    model = conv_net(nn.ReLU)
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(2, 3, 8, 8), 0.5 * torch.randn(1, 3, 8, 8)
    native = deeplift(fn, params, x, None, baseline=baseline)
    via_captum = deeplift(fn, params, x, None, baseline=baseline, backend="captum")
    torch.testing.assert_close(native, via_captum, rtol=1e-5, atol=1e-7)
    best = lambda out: out.max(dim=1).values  # a callable target goes through a wrapped output
    torch.testing.assert_close(deeplift(fn, params, x, best, baseline=baseline, backend="captum"), native,
                               rtol=1e-5, atol=1e-7)
    assert not any(a in m.__dict__ for m in model.modules() for a in ("input", "output", "input_ref"))


# --------------------------------------------------------------------------------------------
# (b) completeness where captum is wrong or refuses; (c) DeepLift is not gradient x input.

@pytest.mark.parametrize("model_cls, shape", [(Reused, (3, 3, 8, 8)), (Functional, (3, 3, 8, 8)),
                                              (VGGish, (3, 3, 8, 8)), (Pool1d, (3, 2, 12))])
def test_completeness_where_captum_fails(model_cls, shape):
    model = model_cls().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(shape), 0.5 * torch.randn(shape)
    target = torch.tensor([1, 0, 3])
    attr = deeplift(fn, params, x, target, baseline=baseline)
    assert attr.shape == x.shape and attr.dtype == x.dtype
    assert_complete(model, attr, x, baseline, target)


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.SELU,
                                 nn.CELU, nn.LogSigmoid, nn.Hardtanh])
def test_completeness_other_activations(act):
    model = mlp(act)
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(4, 6), torch.randn(6)
    target = torch.tensor([0, 1, 2, 3])
    assert_complete(model, deeplift(fn, params, x, target, baseline=baseline), x, baseline, target)


def test_captum_breaks_completeness_on_functional_relu():
    # the reason this module exists: hooks on modules miss F.relu / torch.sigmoid in forward
    model = Functional().eval()
    x, baseline, target = torch.randn(3, 3, 8, 8), 0.5 * torch.randn(3, 3, 8, 8), torch.tensor([1, 0, 3])
    with pytest.raises(AssertionError):
        assert_complete(model, captum_deeplift(model, x, baseline, target), x, baseline, target)
    with pytest.raises(RuntimeError, match="more than once"):
        captum_deeplift(Reused().eval(), x, baseline, target)


def test_differs_from_gradient_times_input():
    model = conv_net(nn.ReLU)
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(3, 3, 8, 8), 0.5 * torch.randn(3, 3, 8, 8)
    target = torch.tensor([0, 1, 2])
    attr = deeplift(fn, params, x, target, baseline=baseline)
    grad = tx.saliency(fn, params, x, target)
    assert (attr - (x - baseline) * grad).abs().max() > 1e-2 * attr.abs().max()
    assert (attr - x * grad).abs().max() > 1e-2 * attr.abs().max()


def test_equal_input_and_baseline_uses_the_gradient():
    model = mlp(nn.Tanh)
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 6)
    baseline = x.clone()
    baseline[:, :3] = 0.0  # half of the features equal to the baseline: |dz| < eps in some units
    attr = deeplift(fn, params, x, 2, baseline=baseline)
    assert torch.isfinite(attr).all()
    assert_complete(model, attr, x, baseline, torch.full((3,), 2))
    assert torch.equal(deeplift(fn, params, x, 2, baseline=x), torch.zeros_like(x))


@pytest.mark.parametrize("act, slope_at_zero", [(torch.tanh, 1.0), (torch.sigmoid, 0.25), (F.softplus, 0.5),
                                                  (F.silu, 0.5)])
def test_equal_differences_keep_the_derivative(act, slope_at_zero):
    # z = x1 - x2 is 0 for the input [a, a] and the baseline [0, 0]: |dz| < eps, so the unit passes
    # act'(0) and the map is [a w act'(0), -a w act'(0)] (worked out by hand).
    def model_fn(params, x):
        return act(x @ params["a"]) * params["w"]
    params = {"a": torch.tensor([[1.0], [-1.0]], dtype=torch.float64), "w": torch.tensor([3.0], dtype=torch.float64)}
    x = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    attr = deeplift(model_fn, params, x, 0, baseline=0.0)
    torch.testing.assert_close(attr, torch.tensor([[6.0, -6.0]], dtype=torch.float64) * slope_at_zero)


def test_inplace_and_functional_forms_agree():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5)).eval()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)

    def method_fn(params, x):
        h = x @ params["0.weight"].T + params["0.bias"]
        return h.relu_() @ params["2.weight"].T + params["2.bias"]

    x, baseline = torch.randn(4, 6), torch.randn(6)
    fn, params = tx.functionalize(plain)
    expected = deeplift(fn, params, x, 1, baseline=baseline)
    torch.testing.assert_close(deeplift(tx.functionalize(inplace)[0], params, x, 1, baseline=baseline), expected)
    torch.testing.assert_close(deeplift(method_fn, params, x, 1, baseline=baseline), expected)


def test_shared_baseline_batch_of_one_equals_full_batch():
    model = Functional().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(3, 3, 8, 8), torch.randn(1, 3, 8, 8)
    shared = deeplift(fn, params, x, 0, baseline=baseline)
    full = deeplift(fn, params, x, 0, baseline=baseline.expand(3, 3, 8, 8).clone())
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-7)


def test_batch_dependent_model_falls_back_to_full_baseline_batch():
    def fixed_batch(params, x):  # hard-wired to batches of 2: a baseline alone makes a tanh of another shape
        h = torch.tanh(x.reshape(2, -1) * params["scale"])
        return h.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    params = {"scale": torch.tensor(1.3), "w": torch.randn(4, 3), "b": torch.randn(3)}
    x, baseline = torch.randn(2, 4), torch.randn(4)
    attr = deeplift(fixed_batch, params, x, 1, baseline=baseline)
    with torch.no_grad():
        delta = fixed_batch(params, x)[:, 1] - fixed_batch(params, baseline.expand(2, 4))[:, 1]
    torch.testing.assert_close(attr.sum(1), delta, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# (d) derivatives w.r.t. parameters.

class Smooth(nn.Module):
    """Tanh, Softplus, Sigmoid, a non-overlapping MaxPool and a Softmax, in float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x):
        h = F.max_pool1d(torch.tanh(self.conv(x)), 2)
        h = F.softplus(self.fc1(h.flatten(1)))
        return torch.softmax(self.fc2(torch.sigmoid(h)), dim=1)


def _smooth_setup():
    torch.manual_seed(3)
    model = Smooth().double().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(2, 2, 4, dtype=torch.float64), 0.3 * torch.randn(2, 2, 4, dtype=torch.float64)
    target = torch.tensor([1, 2])

    def attribution(*tensors, names=("fc1.weight", "conv.weight")):
        return deeplift(fn, dict(params, **dict(zip(names, tensors))), x, target, baseline=baseline)
    return params, attribution


def test_gradcheck_wrt_parameters():
    params, attribution = _smooth_setup()
    w1 = params["fc1.weight"].clone().requires_grad_()
    wc = params["conv.weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(attribution, (w1, wc), eps=1e-6, atol=1e-6)


def test_gradgradcheck_wrt_parameters():
    params, attribution = _smooth_setup()
    bias = params["fc1.bias"].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda b: attribution(b, names=("fc1.bias",)), (bias,), eps=1e-6, atol=1e-5)


def test_func_grad_wrt_parameters_equals_autograd():
    params, attribution = _smooth_setup()
    loss = lambda w1, wc: attribution(w1, wc).pow(2).sum()
    by_func = torch.func.grad(loss, argnums=(0, 1))(params["fc1.weight"], params["conv.weight"])
    w1 = params["fc1.weight"].clone().requires_grad_()
    wc = params["conv.weight"].clone().requires_grad_()
    by_autograd = torch.autograd.grad(loss(w1, wc), (w1, wc))
    torch.testing.assert_close(by_func, by_autograd)


def test_forward_mode_wrt_parameters_equals_finite_differences():
    params, attribution = _smooth_setup()
    w1, wc, direction = params["fc1.weight"], params["conv.weight"], torch.randn_like(params["fc1.weight"])
    with warnings.catch_warnings():  # torch.func.jvp's first use imports code that warns (torch.jit.script)
        warnings.filterwarnings("ignore", message=".*torch.jit.script")
        _, forward = torch.func.jvp(lambda w: attribution(w, wc), (w1,), (direction,))
    h = 1e-6
    finite = (attribution(w1 + h * direction, wc) - attribution(w1 - h * direction, wc)) / (2 * h)
    torch.testing.assert_close(forward, finite, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------
# (e) vmap over stacked parameters, over inputs, and deeplift_shap.

def _ensemble(n=3):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(conv_net(nn.ReLU))
    params, buffers = torch.func.stack_module_state(models)
    return models, {**params, **buffers}


def test_vmap_over_stacked_params_equals_loop():
    models, stacked = _ensemble()
    fn, _ = tx.functionalize(models[0])
    x, baseline, target = torch.randn(2, 3, 8, 8), 0.5 * torch.randn(3, 8, 8), torch.tensor([1, 4])
    batched = torch.func.vmap(lambda p: deeplift(fn, p, x, target, baseline=baseline))(stacked)
    loop = torch.stack([deeplift(fn, tx.params_of(m), x, target, baseline=baseline) for m in models])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-7)

    def loss(p):  # meta-learning: penalise the explanation, differentiate w.r.t. every member's params
        return deeplift(fn, p, x, target, baseline=baseline).abs().sum()
    grads = torch.func.vmap(torch.func.grad(loss))(stacked)
    for i, m in enumerate(models):
        expected = torch.func.grad(loss)(tx.params_of(m))
        torch.testing.assert_close(grads["5.weight"][i], expected["5.weight"], rtol=1e-4, atol=1e-6)


def test_vmap_over_inputs_equals_loop():
    model = Functional().eval()
    fn, params = tx.functionalize(model)
    xs, baseline = torch.randn(2, 3, 3, 8, 8), 0.5 * torch.randn(3, 8, 8)
    batched = torch.func.vmap(lambda xb: deeplift(fn, params, xb, 2, baseline=baseline))(xs)
    loop = torch.stack([deeplift(fn, params, xb, 2, baseline=baseline) for xb in xs])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-7)


def test_deeplift_shap_is_the_mean_over_baselines():
    model = Functional().eval()
    fn, params = tx.functionalize(model)
    x, baselines, target = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 8, 8), torch.tensor([0, 3])
    shap = deeplift_shap(fn, params, x, target, baselines=baselines)
    mean = torch.stack([deeplift(fn, params, x, target, baseline=b) for b in baselines]).mean(0)
    torch.testing.assert_close(shap, mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(deeplift_shap(fn, params, x, target, baselines=baselines, batch_size=2), mean,
                               rtol=1e-5, atol=1e-7)
    # the mean of complete maps is complete w.r.t. the mean baseline output
    with torch.no_grad():
        delta = score(model, x, target) - torch.stack([score(model, b.expand_as(x), target) for b in baselines]).mean(0)
    torch.testing.assert_close(shap.flatten(1).sum(1), delta, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# (f) torchvision resnet18: reused and in-place ReLUs, overlapping max pooling.

def test_resnet18_completeness():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # BN at init is ~identity with zero shift: make the biases non-zero
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(2, 3, 32, 32), 0.3 * torch.randn(1, 3, 32, 32)
    target = torch.tensor([3, 7])
    attr = deeplift(fn, params, x, target, baseline=baseline)
    assert attr.shape == x.shape
    assert_complete(model, attr, x, baseline, target)
    grad = tx.saliency(fn, params, x, target)
    assert (attr - (x - baseline) * grad).abs().max() > 1e-2 * attr.abs().max()


# --------------------------------------------------------------------------------------------
# (g) nothing left behind.

def _mode_active() -> bool:
    return has_torch_function((torch.zeros(1),))


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def test_no_state_left_after_success():
    model = Reused().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    deeplift(fn, params, x, 1, baseline=0.1)
    assert not _mode_active() and _hooks(model) == 0 and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not x.requires_grad


class _Raises(nn.Module):
    def __init__(self, on_call):
        super().__init__()
        self.inner, self.on_call, self.calls = conv_net(nn.ReLU), on_call, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.on_call:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("on_call, general", [(1, False), (2, False), (1, True), (2, True), (3, True)])
def test_no_state_left_after_a_raising_model(on_call, general):
    # plain calls make two passes (baseline, gradient); differentiable calls three (baseline, input, gradient)
    model = _Raises(on_call).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8).requires_grad_(general)
    with pytest.raises(RuntimeError, match="boom"):
        deeplift(fn, params, x, 1, baseline=0.1)
    assert not _mode_active() and _hooks(model) == 0
    assert model.calls == on_call


def test_plain_and_differentiable_paths_agree():
    model = Functional().eval()
    fn, params = tx.functionalize(model)
    calls = []

    def counted(p, t):
        calls.append(1)
        return fn(p, t)
    x, baseline = torch.randn(3, 3, 8, 8), 0.5 * torch.randn(3, 8, 8)
    plain = deeplift(counted, params, x, 2, baseline=baseline)
    assert len(calls) == 2
    tracked = deeplift(counted, params, x.clone().requires_grad_(), 2, baseline=baseline)
    assert len(calls) == 5 and tracked.requires_grad
    torch.testing.assert_close(tracked.detach(), plain, rtol=1e-5, atol=1e-7)


def test_rewrite_mode_is_popped_when_the_handler_raises():
    def handler(call):
        raise KeyError("handler")
    with pytest.raises(KeyError):
        intercept.run(lambda t: torch.relu(t), handler, torch.randn(3))
    assert not _mode_active()
    out, count = intercept.run(lambda t: torch.tanh(t) + t.sigmoid(), lambda c: c.apply(c.input), torch.zeros(2))
    assert count == 2 and torch.equal(out, torch.full((2,), 0.5))


# --------------------------------------------------------------------------------------------
# (h) errors.

class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return torch.relu(h) if bool(x.sum() > 0) else torch.sigmoid(h)


@pytest.mark.parametrize("kwargs, x, target, error, match", [
    ({"baseline": torch.zeros(3, 3, 8, 8)}, None, None, ValueError,
     r"deeplift: expected baseline broadcastable to x's shape \[2, 3, 8, 8\]"),
    ({"baseline": torch.zeros(4, 4)}, None, None, ValueError, "deeplift: expected baseline broadcastable"),
    ({"baseline": torch.zeros(1, 3, 8, 8, dtype=torch.long)}, None, None, TypeError,
     "deeplift: expected baseline of a floating-point dtype"),
    ({"baseline": float("nan")}, None, None, ValueError, "deeplift: expected baseline without NaN"),
    ({"baseline": "zero"}, None, None, TypeError, "deeplift: expected baseline, a float or a tensor"),
    ({}, torch.ones(2, 3, 8, 8, dtype=torch.uint8), None, TypeError,
     "deeplift: expected x of a floating-point dtype, got a torch.uint8 tensor"),
    ({}, "nan", None, ValueError, "deeplift: expected x without NaN, got 1 NaN values"),
    ({}, None, 5, ValueError, r"deeplift: expected target in \[0, 5\), got int 5"),
    ({}, None, torch.tensor([0, 9]), ValueError, r"deeplift: expected target values in \[0, 5\), got \[9\]"),
    ({"backend": "zennit"}, None, None, ValueError,
     "deeplift: expected backend 'native' or 'captum', got str 'zennit'"),
    ({"eps": -1.0}, None, None, ValueError, "deeplift: expected eps, a finite float >= 0"),
])
def test_errors(kwargs, x, target, error, match):
    fn, params = tx.functionalize(conv_net(nn.ReLU))
    if x is None:
        x = torch.randn(2, 3, 8, 8)
    elif isinstance(x, str):
        x = torch.randn(2, 3, 8, 8)
        x[1, 0, 2, 2] = float("nan")
    with pytest.raises(error, match=match):
        deeplift(fn, params, x, target, **kwargs)


def test_error_when_the_baseline_takes_another_branch():
    fn, params = tx.functionalize(_Branchy().eval())
    with pytest.raises(ValueError, match="deeplift: expected the baseline pass to make the same nonlinear calls"):
        deeplift(fn, params, torch.full((2, 4), 1.0), 0, baseline=-1.0)
    assert not _mode_active()


def test_captum_backend_errors(monkeypatch):
    model = conv_net(nn.ReLU)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="deeplift: expected a model_fn built by functionalize"):
        deeplift(lambda p, t: fn(p, t), params, x, 0, backend="captum")
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match="deeplift: backend='captum' needs the captum package"):
        deeplift(fn, params, x, 0, backend="captum")


def test_shap_errors():
    fn, params = tx.functionalize(conv_net(nn.ReLU))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"deeplift_shap: expected baselines of shape \[N, 3, 8, 8\]"):
        deeplift_shap(fn, params, x, 0, baselines=torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="deeplift_shap: expected baselines, a tensor"):
        deeplift_shap(fn, params, x, 0, baselines=0.0)
    with pytest.raises(TypeError, match="deeplift_shap: expected batch_size, a positive int"):
        deeplift_shap(fn, params, x, 0, baselines=torch.zeros(2, 3, 8, 8), batch_size=1.5)


# --------------------------------------------------------------------------------------------
# (i) products, normalisations, attention and the operations without a rule.

def _delta(model_fn, params, x, baseline, target):
    with torch.no_grad():
        out = model_fn(params, x)[:, target] - model_fn(params, torch.broadcast_to(baseline, x.shape))[:, target]
    return out


def test_groupnorm_repro_is_complete():
    # the three-layer repro (a factor of 29 off when GroupNorm passed as linear)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(1, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).double().eval()
    fn, params = tx.functionalize(model)
    x, baseline = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2])
    assert_complete(model, deeplift(fn, params, x, target, baseline=baseline), x, baseline, target, atol=1e-12)


def test_product_rule_by_hand():
    # f(x) = (x1 + x2) * (x1 - x2): a = x1 + x2, b = x1 - x2 both depend on x. The product rule gives a
    # the multiplier mean(b) and b the multiplier mean(a): with x = [3, 1] and the baseline [1, 0],
    # a: 4 vs 1, b: 2 vs 1, so dF/dx1 = 1.5 + 2.5 = 4, dF/dx2 = 1.5 - 2.5 = -1 and the map is
    # [4 * 2, -1 * 1] = [8, -1], summing to f(x) - f(b) = 8 - 1 = 7.
    def model_fn(params, x):
        a = x[:, :1] + x[:, 1:]
        b = x[:, :1] - x[:, 1:]
        return a * b
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    attr = deeplift(model_fn, {}, x, 0, baseline=torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(attr, torch.tensor([[8.0, -1.0]], dtype=torch.float64))


def test_a_parameter_times_the_input_stays_linear():
    # w * x with w a parameter is linear: no rule is applied and the map is (x - b) * w exactly
    calls = []

    def model_fn(params, x):
        return (params["w"] * x).sum(1, keepdim=True) + params["w"].sum()
    params = {"w": torch.tensor([2.0, -3.0], dtype=torch.float64)}
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(deeplift(model_fn, params, x, 0, baseline=0.5),
                               (x - 0.5) * params["w"])
    _, count = intercept.run(model_fn, lambda c: calls.append(c) or c.apply(*c.inputs), params, x, tainted=[x])
    assert count == 0 and not calls


class ManyOps(nn.Module):
    """Elementwise functions, divisions, powers, extrema, a hand-written norm, matmul of two activations."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        a, b = self.fc1(x), self.fc2(x)
        h = a * torch.sigmoid(b) + torch.exp(-a.abs()) / (1 + b.pow(2)) + torch.maximum(a, b) - a.clamp(-0.5, 0.5)
        h = h + torch.log1p(b * b).sqrt() + F.hardswish(a) * F.mish(b) + torch.erf(a) + 1 / (2 + torch.tanh(b))
        u = h - h.mean(-1, keepdim=True)                           # a LayerNorm written by hand
        h = u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + 1e-5)
        gram = torch.einsum("bi,bj->bij", h, a).softmax(-1) @ b.unsqueeze(-1)
        return self.fc3(F.gelu(gram.squeeze(-1), approximate="tanh") + torch.rsqrt(1 + h * h) + (2.0 ** a) * 0.1)


class Attention(nn.Module):
    """nn.MultiheadAttention with a padding mask, SDPA with a causal mask, a layer norm and RMS norm."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln, self.rms, self.out = nn.LayerNorm(8), nn.RMSNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        h, _ = self.mha(x, x, x, key_padding_mask=pad)
        h = self.ln(h + x)
        q = self.rms(h).unflatten(-1, (2, 4)).transpose(1, 2)
        h = h + F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).flatten(2)
        return self.out(h.mean(1))


@pytest.mark.parametrize("model_cls, shape", [(ManyOps, (3, 6)), (Attention, (3, 5, 8))])
@pytest.mark.parametrize("baseline", ["zero", "random"])
def test_completeness_float64_many_ops(model_cls, shape, baseline):
    torch.manual_seed(0)
    model = model_cls().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(shape, dtype=torch.float64)
    base = torch.zeros(shape[1:], dtype=torch.float64) if baseline == "zero" else torch.randn(shape, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    attr = deeplift(fn, params, x, target, baseline=base)
    assert_complete(model, attr, x, base, target, atol=1e-10)
    tracked = deeplift(fn, params, x.clone().requires_grad_(), target, baseline=base)  # the general path
    torch.testing.assert_close(tracked.detach(), attr)


def test_batch_norm_with_batch_statistics_is_complete():
    # (nn.BatchNorm in training mode also increments a buffer in place, which torch.func.grad refuses
    # for any method; the functional form with batch statistics is what a functional model writes)
    torch.manual_seed(0)
    params = {"w1": torch.randn(6, 4, dtype=torch.float64), "g": torch.rand(6, dtype=torch.float64) + 0.5,
              "b": torch.randn(6, dtype=torch.float64), "w2": torch.randn(2, 6, dtype=torch.float64)}

    def model_fn(p, x):
        h = F.batch_norm(x @ p["w1"].T, None, None, p["g"], p["b"], training=True)
        return torch.tanh(h) @ p["w2"].T
    x, baseline = torch.randn(5, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    attr = deeplift(model_fn, params, x, 1, baseline=baseline)
    # batch statistics couple the examples (each one moves the others' scores), so completeness holds
    # for the batch: the map sums to the total difference from a batch of baselines
    torch.testing.assert_close(attr.sum(), _delta(model_fn, params, x, baseline, 1).sum(), rtol=0, atol=1e-10)


def test_unknown_operation_raises_instead_of_passing_as_linear():
    def model_fn(params, x):
        return torch.cumprod(torch.tanh(x), dim=1)
    with pytest.raises(NotImplementedError, match=r"deeplift: expected operations with a DeepLIFT rule on "
                                                  r"input-dependent tensors, got 'cumprod'"):
        deeplift(model_fn, {}, torch.randn(2, 3), 0)
    assert not _mode_active()

    def fine(params, x):  # the same operation on a tensor that does not depend on x is fine
        return torch.tanh(x) * torch.cumprod(params["w"], dim=0)
    attr = deeplift(fine, {"w": torch.tensor([1.0, 2.0, 3.0])}, torch.randn(2, 3), 0)
    assert attr.shape == (2, 3)


def test_dropout_in_training_mode_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    fn, params = tx.functionalize(model)
    with pytest.raises(NotImplementedError, match="dropout in training mode"), \
            pytest.warns(tx.TrainingModeWarning, match="deeplift: expected a model in eval mode"):
        deeplift(fn, params, torch.randn(2, 4), 0)


def test_inplace_write_of_an_input_dependent_value_taints_its_target():
    # (torch.func.grad refuses writes into tensors created inside the function, so this checks the
    # tracking itself: the product of the written buffer with itself is handed over as a product)
    def model_fn(params, x):
        buf = torch.zeros(x.shape[0], 2, dtype=x.dtype)
        buf[:, 0] = torch.tanh(x[:, 0])            # __setitem__: buf now depends on x
        buf += params["w"]                           # an in-place linear op keeps it so
        return buf * buf
    calls = []
    x = torch.randn(3, 2)
    intercept.run(model_fn, lambda c: calls.append((c.kind, c.name)) or c.apply(*c.inputs), {"w": torch.ones(2)}, x,
                 tainted=[x])
    assert calls == [("elementwise", "tanh"), ("bilinear", "mul")]


def test_softmax_option_errors():
    fn, params = tx.functionalize(SoftmaxNet().eval())
    with pytest.raises(ValueError, match="deeplift: expected softmax 'conserving' or 'captum', got str 'exact'"):
        deeplift(fn, params, torch.randn(2, 6), 0, softmax="exact")
    with pytest.raises(TypeError, match="deeplift_shap: expected softmax, 'conserving' or 'captum'"):
        deeplift_shap(fn, params, torch.randn(2, 6), 0, baselines=torch.zeros(2, 6), softmax=None)


def test_attention_vmap_shap_and_gradcheck():
    torch.manual_seed(0)
    model = Attention().double().eval()
    with torch.no_grad():  # (a layer norm at its init makes the RMS norm after it see variance 1 in both
        model.ln.weight.uniform_(0.5, 1.5)  # passes: a tie where the map is computed from round-off)
        model.ln.bias.uniform_(-0.3, 0.3)
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    baselines = torch.randn(3, 5, 8, dtype=torch.float64)
    shap = deeplift_shap(fn, params, x, 1, baselines=baselines)
    loop = torch.stack([deeplift(fn, params, x, 1, baseline=b) for b in baselines]).mean(0)
    torch.testing.assert_close(shap, loop)
    xs = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    batched = torch.func.vmap(lambda xb: deeplift(fn, params, xb, 1, baseline=0.0))(xs)
    torch.testing.assert_close(batched, torch.stack([deeplift(fn, params, xb, 1, baseline=0.0) for xb in xs]))

    def attribution(w, g):
        return deeplift(fn, dict(params, **{"out.weight": w, "ln.weight": g}), x, 1, baseline=baselines[0])
    w = params["out.weight"].clone().requires_grad_()
    g = params["ln.weight"].clone().requires_grad_()
    assert torch.autograd.gradcheck(attribution, (w, g), eps=1e-6, atol=1e-6)
