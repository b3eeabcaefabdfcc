"""torchex_fn.metrics: closed-form deletion / insertion curves, pointing games, sanity check."""
import functools

import pytest
import torch

import torchex_fn as tx
from torchex_fn import metrics
from support.models import TinyCNN

H = W = 8
REGION = (slice(0, 4), slice(0, 4))  # 16 of 64 pixels


def region_mean(params, x):
    """Score = mean of the top-left 4 x 4 region over channels, as a [B, 1] output."""
    del params
    return x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))[:, None]


def region_map(batch=1, inside=1.0, outside=0.0):
    m = torch.full((batch, 1, H, W), outside, dtype=torch.float64)
    m[:, :, REGION[0], REGION[1]] = inside
    return m


def curve(kind, attribution, target=0, **kw):
    x = torch.ones(attribution.shape[0], 3, H, W, dtype=torch.float64)
    options = dict(step=4, probabilities=False)
    if kind == "insertion":
        options["substrate"] = torch.zeros(())
    options.update(kw)
    return getattr(metrics, kind)(region_mean, {}, x, attribution, target, **options)


def test_deletion_of_a_perfect_map_has_the_closed_form_curve():
    # Region pixels go first, 4 per step: the score falls 1, .75, .5, .25, 0 and stays 0.
    result = curve("deletion", region_map())
    expected = torch.tensor([1, .75, .5, .25] + [0] * 13, dtype=torch.float64)
    torch.testing.assert_close(result.curve[0], expected)
    torch.testing.assert_close(result.fraction, torch.arange(17, dtype=torch.float64) / 16)
    torch.testing.assert_close(result.auc, torch.tensor([0.125], dtype=torch.float64))  # = (16 / 64) / 2


def test_deletion_ranks_perfect_below_random_below_inverse():
    gen = torch.Generator().manual_seed(0)
    random = torch.rand(4, 1, H, W, generator=gen, dtype=torch.float64)
    perfect = curve("deletion", region_map(4)).auc
    rand = curve("deletion", random).auc
    inverse = curve("deletion", region_map(4, inside=0.0, outside=1.0)).auc
    torch.testing.assert_close(inverse, torch.full((4,), 0.875, dtype=torch.float64))  # 12 / 16 + 0.125
    assert (perfect < rand).all() and (rand < inverse).all()


def test_insertion_mirrors_deletion():
    perfect = curve("insertion", region_map())
    torch.testing.assert_close(perfect.curve[0, :5], torch.tensor([0, .25, .5, .75, 1], dtype=torch.float64))
    torch.testing.assert_close(perfect.auc, torch.tensor([0.875], dtype=torch.float64))
    inverse = curve("insertion", region_map(inside=0.0, outside=1.0))
    torch.testing.assert_close(inverse.auc, torch.tensor([0.125], dtype=torch.float64))


def test_uneven_steps_end_with_every_pixel_changed():
    result = curve("deletion", region_map(), step=10)  # 64 pixels: 7 steps, the last of 4 pixels
    assert result.curve.shape == (1, 8)
    assert result.fraction[-1] == 1 and result.curve[0, -1] == 0
    torch.testing.assert_close(result.fraction[:-1], torch.arange(7, dtype=torch.float64) * 10 / 64)


def test_channels_are_summed_and_small_maps_are_resized():
    three = region_map().expand(1, 3, H, W) / 3
    torch.testing.assert_close(curve("deletion", three).curve, curve("deletion", region_map()).curve)
    coarse = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    coarse[0, 0, 0, 0] = 1  # the top-left quarter, upsampled bilinearly, still ranks the region first
    assert curve("deletion", coarse).auc < 0.2


def test_batch_size_only_groups_the_work_and_none_target_is_the_prediction():
    model = TinyCNN().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(3, 3, H, W, dtype=torch.float64)
    attribution = torch.rand(3, 1, H, W, dtype=torch.float64)
    a = metrics.deletion(fn, params, x, attribution, None, step=8, batch_size=1)
    b = metrics.deletion(fn, params, x, attribution, None, step=8, batch_size=1000)
    torch.testing.assert_close(a.curve, b.curve)
    predicted = model(x).argmax(1)
    c = metrics.deletion(fn, params, x, attribution, predicted, step=8)
    torch.testing.assert_close(a.curve, c.curve)
    torch.testing.assert_close(a.curve[:, 0], torch.softmax(model(x), 1).gather(1, predicted[:, None])[:, 0])
    assert ((a.curve >= 0) & (a.curve <= 1)).all()


def test_default_insertion_substrate_is_a_blur_and_curves_are_differentiable():
    model = TinyCNN().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(2, 3, H, W, dtype=torch.float64, requires_grad=True)
    result = metrics.insertion(fn, params, x, torch.rand(2, 1, H, W, dtype=torch.float64), 1, step=16)
    blurred = torch.softmax(model(metrics.gaussian_blur(x)), 1)[:, 1]
    torch.testing.assert_close(result.curve[:, 0], blurred)
    (grad,) = torch.autograd.grad(result.auc.sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_gaussian_blur_keeps_constants_and_smooths():
    const = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(metrics.gaussian_blur(const), const)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1
    blurred = metrics.gaussian_blur(spike, sigma=2.0, kernel_size=7)
    assert blurred.max() < 0.1 and abs(float(blurred.sum()) - 1) < 1e-5
    with pytest.raises(ValueError, match="gaussian_blur: expected an odd kernel_size"):
        metrics.gaussian_blur(spike, kernel_size=4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(attribution=torch.rand(2, 1, H, W)), ValueError, "deletion: expected attribution of shape"),
    (dict(step=0), ValueError, "deletion: expected step >= 1"),
    (dict(batch_size=1.5), TypeError, "deletion: expected batch_size"),
    (dict(target=5), ValueError, r"deletion: expected target in \[0, 1\)"),
    (dict(attribution=torch.ones(1, 1, H, W, dtype=torch.long)), TypeError, "deletion: expected attribution of a floating"),
])
def test_curve_errors_name_the_function(kwargs, error, match):
    args = dict(attribution=torch.rand(1, 1, H, W), target=0, step=4, batch_size=8)
    args.update(kwargs)
    x = torch.rand(1, 3, H, W)
    with pytest.raises(error, match=match):
        metrics.deletion(region_mean, {}, x, args["attribution"], args["target"], step=args["step"],
                         batch_size=args["batch_size"], probabilities=False)


# ------------------------------------------------------------------------------------ pointing games
def spot_and_block():
    attribution = torch.zeros(1, 1, 32, 32)
    attribution[0, 0, 10, 10] = 1.0  # the maximum
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 10:13, 20:23] = True  # nearest mask pixel (10, 20): distance 10
    return attribution, mask


@pytest.mark.parametrize("tolerance, hit", [(15, True), (10, True), (9.9, False), (0, False)])
def test_pointing_game_tolerance(tolerance, hit):
    attribution, mask = spot_and_block()
    result = metrics.pointing_game(attribution, mask, tolerance=tolerance)
    assert result.hit.tolist() == [hit]
    assert result.point.tolist() == [[10, 10]]


def test_pointing_game_hits_on_the_mask_and_misses_an_empty_mask():
    attribution, mask = spot_and_block()
    attribution[0, 0, 11, 21] = 2.0
    assert metrics.pointing_game(attribution, mask, tolerance=0).hit.all()
    assert not metrics.pointing_game(attribution, torch.zeros_like(mask), tolerance=15).hit.any()
    # a [B, H, W] map and mask, batched: one hit, one miss
    maps = torch.cat([attribution, spot_and_block()[0]])[:, 0]
    masks = torch.cat([mask, mask])[:, 0]
    assert metrics.pointing_game(maps, masks, tolerance=5).hit.tolist() == [True, False]


def test_pointing_game_errors():
    attribution, mask = spot_and_block()
    with pytest.raises(ValueError, match="pointing_game: expected tolerance >= 0"):
        metrics.pointing_game(attribution, mask, tolerance=-1)
    with pytest.raises(ValueError, match="pointing_game: expected attribution of shape"):
        metrics.pointing_game(attribution.expand(2, 1, 32, 32), mask)


def test_energy_pointing_game_exact_value_and_gradient():
    attribution = torch.full((1, 1, 4, 4), -5.0)
    attribution[0, 0, :2, :2] = 3.0  # 4 pixels inside: 12
    attribution[0, 0, 3, :] = 1.0  # 4 pixels outside: 4; the negative ones do not count
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2, :2] = True
    attribution.requires_grad_(True)
    value = metrics.energy_pointing_game(attribution, mask)
    torch.testing.assert_close(value, torch.tensor([0.75]))
    (grad,) = torch.autograd.grad(value.sum(), attribution)
    assert grad[0, 0, 0, 0] > 0 and grad[0, 0, 3, 0] < 0 and grad[0, 0, 2, 0] == 0
    assert metrics.energy_pointing_game(-torch.ones(1, 4, 4), mask).item() == 0.0


# ------------------------------------------------------------------------------------- sanity check
def test_spearman_extremes():
    a = torch.randn(2, 50)
    torch.testing.assert_close(metrics.spearman(a, a * 3 + 1), torch.ones(2))
    torch.testing.assert_close(metrics.spearman(a, -a), -torch.ones(2))


def test_randomization_check_separates_model_dependent_maps_from_edge_detectors():
    model = TinyCNN(act=torch.nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(3, 3, 12, 12)
    gen = torch.Generator().manual_seed(0)
    check = metrics.randomization_check(functools.partial(tx.grad_cam, layer="features"), fn, params, x, 0,
                                        generator=gen)
    assert check.layers == ("fc", "features", "conv1")
    assert check.correlation.shape == (3, 3)
    assert check.correlation.mean() < 0.9

    def edges(model_fn, params, x, target):  # ignores the model: must stay perfectly correlated
        del model_fn, params, target
        return (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)
    same = metrics.randomization_check(edges, fn, params, x, 0, generator=gen)
    torch.testing.assert_close(same.correlation, torch.ones(3, 3))
    with pytest.raises(ValueError, match="randomization_check: unknown layer prefix"):
        metrics.randomization_check(edges, fn, params, x, 0, layers=["fcc"])


def test_callable_target_sees_the_flattened_batch_and_matches_an_index():
    by_index = curve("deletion", region_map(2), batch_size=5)
    by_callable = curve("deletion", region_map(2), target=lambda out: out[:, 0], batch_size=5)
    torch.testing.assert_close(by_callable.curve, by_index.curve)


# ------------------------------------------------------------------------ infidelity / sensitivity
def _gaussian(std):
    def perturb(x, gen):
        noise = std * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return noise, x - noise
    return perturb


def _interleaved(draw, n, batch):
    """Captum perturbs ``repeat_interleave(x, n)`` in one call: replay our n per-sample draws in that order."""
    def perturb(inputs, *rest):
        rows = [draw(inputs[::n]) for _ in range(n)]  # n times [B, ...]
        if isinstance(rows[0], tuple):
            return tuple(torch.stack([r[i] for r in rows], 1).flatten(0, 1) for i in range(2))
        return torch.stack(rows, 1).flatten(0, 1)
    return perturb


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captum_given_the_same_perturbations(normalize):
    captum_metrics = pytest.importorskip("captum.metrics")
    model = TinyCNN().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(3, 3, H, W, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    attr = tx.saliency(fn, params, x, target)
    n, std = 7, 0.05
    ours = metrics.infidelity(fn, params, x, attr, target, perturb_fn=_gaussian(std), n_perturb_samples=n,
                              normalize=normalize, batch_size=6, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    theirs = captum_metrics.infidelity(model, _interleaved(lambda xb: _gaussian(std)(xb, gen), n, 3), x, attr,
                                       target=target, n_perturb_samples=n, normalize=normalize)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-12)
    assert (ours.detach() > 0).all()


def test_infidelity_of_an_exact_linear_attribution_is_zero_and_normalize_removes_the_scale():
    weight = torch.randn(1, 3 * H * W, dtype=torch.float64)

    def linear(params, x):
        del params
        return x.flatten(1) @ weight.T  # [B, 1]
    x = torch.rand(2, 3, H, W, dtype=torch.float64)
    exact = weight.view(1, 3, H, W).expand(2, 3, H, W)
    gen = torch.Generator().manual_seed(0)
    zero = metrics.infidelity(linear, {}, x, exact, 0, perturb_fn=_gaussian(0.1), generator=gen)
    torch.testing.assert_close(zero, torch.zeros(2, dtype=torch.float64), atol=1e-20, rtol=0)
    scaled = metrics.infidelity(linear, {}, x, 5 * exact, 0, perturb_fn=_gaussian(0.1), generator=gen)
    assert (scaled > 1e-3).all()
    normal = metrics.infidelity(linear, {}, x, 5 * exact, 0, perturb_fn=_gaussian(0.1), generator=gen,
                                normalize=True)
    torch.testing.assert_close(normal, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_infidelity_is_reproducible_chunk_independent_and_differentiable_in_params():
    model = TinyCNN().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)

    def loss(p, batch_size=64):
        attr = tx.saliency(fn, p, x, 1)
        return metrics.infidelity(fn, p, x, attr, 1, perturb_fn=_gaussian(0.1), n_perturb_samples=5,
                                  batch_size=batch_size, generator=torch.Generator().manual_seed(3)).sum()
    assert torch.equal(loss(params), loss(params))
    torch.testing.assert_close(loss(params, batch_size=2), loss(params))
    grads = torch.func.grad(loss)(params)
    key = "fc.weight"
    direction = torch.randn_like(params[key])
    eps = 1e-6
    plus, minus = dict(params), dict(params)
    plus[key], minus[key] = params[key] + eps * direction, params[key] - eps * direction
    numeric = (loss(plus) - loss(minus)) / (2 * eps)
    torch.testing.assert_close((grads[key] * direction).sum(), numeric, rtol=1e-5, atol=1e-10)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_sensitivity_max_equals_captum_given_the_same_perturbations():
    captum_metrics = pytest.importorskip("captum.metrics")
    captum_attr = pytest.importorskip("captum.attr")
    model = TinyCNN().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.rand(3, 3, H, W, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    n, radius = 6, 0.05
    ours = metrics.sensitivity_max(lambda xx: tx.saliency(fn, params, xx, target), x, perturb_radius=radius,
                                   n_perturb_samples=n, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    draw = _interleaved(lambda xb: metrics.uniform_perturbation(xb, radius, gen), n, 3)
    saliency = captum_attr.Saliency(model)

    def explain(inputs, target):
        packed = isinstance(inputs, tuple)  # the unperturbed call passes a tuple and expects one back
        inputs = inputs[0] if packed else inputs
        with torch.enable_grad():  # captum calls this under no_grad
            attr = saliency.attribute(inputs.detach().requires_grad_(), target=target, abs=False)
        return (attr,) if packed else attr
    theirs = captum_metrics.sensitivity_max(explain, x, perturb_func=draw, perturb_radius=radius,
                                            n_perturb_samples=n, target=target)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-12)
    assert (ours > 0).all()


def test_sensitivity_max_of_a_model_independent_map_and_noise_bounds():
    x = torch.rand(2, 3, H, W, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    const = metrics.sensitivity_max(lambda xx: torch.ones_like(xx), x, generator=gen)
    torch.testing.assert_close(const, torch.zeros(2, dtype=torch.float64))
    identity = metrics.sensitivity_max(lambda xx: xx, x, perturb_radius=0.1, n_perturb_samples=20, generator=gen)
    bound = 0.1 * (3 * H * W) ** 0.5 / x.flatten(1).norm(dim=1)  # ||delta|| <= r sqrt(D)
    assert (identity > 0).all() and (identity <= bound).all()
    moved = metrics.uniform_perturbation(x, 0.1, torch.Generator().manual_seed(5))
    assert (moved - x).abs().max() <= 0.1 and not torch.equal(moved, x)


@pytest.mark.parametrize("call, error, match", [
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 0, perturb_fn=None), TypeError,
     "infidelity: expected perturb_fn, a callable"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a[:, :, :2], 0, perturb_fn=_gaussian(0.1)), ValueError,
     "infidelity: expected attribution broadcastable"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a[0], 0, perturb_fn=_gaussian(0.1)), ValueError,
     "infidelity: expected attribution of rank 4"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 0, perturb_fn=lambda x, g: x), TypeError,
     "infidelity: expected perturb_fn to return a pair"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 0, perturb_fn=lambda x, g: (x[:, :1], x)), ValueError,
     "infidelity: expected perturb_fn's perturbation of x's shape"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 9, perturb_fn=_gaussian(0.1)), ValueError,
     r"infidelity: expected target in \[0, 5\)"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 0, perturb_fn=_gaussian(0.1), n_perturb_samples=0),
     ValueError, "infidelity: expected n_perturb_samples >= 1"),
    (lambda fn, p, x, a: metrics.infidelity(fn, p, x, a, 0, perturb_fn=_gaussian(0.1), generator=1), TypeError,
     "infidelity: expected generator"),
    (lambda fn, p, x, a: metrics.sensitivity_max(None, x), TypeError, "sensitivity_max: expected explain_fn"),
    (lambda fn, p, x, a: metrics.sensitivity_max(lambda xx: xx, x, perturb_radius=-1), ValueError,
     "sensitivity_max: expected perturb_radius >= 0"),
    (lambda fn, p, x, a: metrics.sensitivity_max(lambda xx: xx[:1], x), ValueError,
     "sensitivity_max: expected explain_fn to return a map of batch 2"),
    (lambda fn, p, x, a: metrics.sensitivity_max(lambda xx: xx.long(), x), TypeError,
     "sensitivity_max: expected explain_fn to return a floating-point tensor"),
    (lambda fn, p, x, a: metrics.sensitivity_max(lambda xx: xx, x.long()), TypeError,
     "sensitivity_max: expected x of a floating-point dtype"),
])
def test_infidelity_and_sensitivity_errors(call, error, match):
    fn, params = tx.functionalize(TinyCNN().eval())
    x = torch.rand(2, 3, H, W)
    with pytest.raises(error, match=match):
        call(fn, params, x, torch.rand(2, 1, H, W))


# ---------------------------------------------------------- sanity check on the trained demo model
@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The default demo model: from the user cache if it is there, else trained (~20-50 s) into a temp folder."""
    from torchex_fn.data import demo_model as _demo_model
    config = _demo_model.TrainConfig()
    cached = _demo_model.cache_path(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _demo_model.load_or_train(config, cache=cached.parent if cached.is_file()
                                           else tmp_path_factory.mktemp("demo_cache"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.model, config


def sobel(model_fn, params, x, target):
    """Gradient magnitude of the grey image: an 'explanation' that never looks at the model."""
    del model_fn, params, target
    kernel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype)
    grey = x.mean(dim=1, keepdim=True)
    gx = torch.nn.functional.conv2d(grey, kernel.view(1, 1, 3, 3), padding=1)
    gy = torch.nn.functional.conv2d(grey, kernel.t().reshape(1, 1, 3, 3), padding=1)
    return (gx ** 2 + gy ** 2).sqrt()


@pytest.mark.slow
def test_randomization_check_flags_an_edge_detector_but_not_the_gradient_methods(demo_model):
    from torchex_fn import datasets
    model, config = demo_model
    fn, params = tx.functionalize(model)
    data = datasets.shapes(8, seed=7, difficulty=config.difficulty)
    x, y = data.images, data.labels
    edges = metrics.randomization_check(sobel, fn, params, x, y, generator=torch.Generator().manual_seed(0))
    assert edges.layers == ("fc", "features", "stem")
    assert edges.correlation.min() > 0.99  # model-independent: the check flags it

    methods = {
        "saliency": tx.saliency,
        "input_x_gradient": tx.input_x_gradient,
        "grad_cam": functools.partial(tx.grad_cam, layer="features"),
        "cam": functools.partial(tx.cam, layer="features", fc="fc"),
    }
    if hasattr(tx, "deeplift"):
        methods["deeplift"] = functools.partial(tx.deeplift, baseline=0.0)
    for name, method in methods.items():
        check = metrics.randomization_check(method, fn, params, x, y, generator=torch.Generator().manual_seed(0))
        per_layer = check.correlation.mean(dim=1)  # measured (16 images): final 0.10 (saliency) to 0.36 (input x gradient)
        assert per_layer[-1] < 0.5, (name, per_layer.tolist())
        assert per_layer.max() < 0.8, (name, per_layer.tolist())
