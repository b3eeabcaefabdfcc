"""Eigen-Grad-CAM, Seg-Eigen-CAM, element-wise Grad-CAM, FEM, KPCA-CAM, Finer-CAM, ShapleyCAM, SS-CAM,
IS-CAM, Smooth Grad-CAM++ and Deep Feature Factorization: peer parity, closed forms, errors.

Peer parity on randomly initialised resnet18 (BatchNorm calibrated, see support/parity.py), 2 images of
64 x 64, to 1e-5 of the map's max. pytorch-grad-cam's raw maps are read with ``get_cam_image`` (before its
ReLU and scaling) or, for the classes that run their own pipeline (FinerCAM, ShapleyCAM), with its
``scale_cam_image`` replaced by the identity (after its ReLU). torchcam's maps are ``normalized=False``.
ShapleyCAM's Hessian term vanishes on a ReLU network, so it is also compared on resnet18 with SiLU.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn
import pytorch_grad_cam.base_cam as pgc_base
from pytorch_grad_cam import (FEM, KPCA_CAM, EigenGradCAM, FinerCAM, GradCAM, GradCAMElementWise, RefineCAM,
                              SegEigenCAM, ShapleyCAM)
from pytorch_grad_cam.feature_factorization.deep_feature_factorization import dff
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.decomposition._nmf import _initialize_nmf
from torchcam.methods import ISCAM, SSCAM, SmoothGradCAMpp

import torchex_fn as tx
from support.models import LinearHead
from support.parity import assert_no_hooks, assert_parity, peer_model

LABELS = torch.tensor([3, 517])


def _input(size=64):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4321))


def _pgc_raw(cls, model, layer, x, **options):
    """pytorch-grad-cam's raw map of one layer, before its ReLU and scaling, [B, h, w]."""
    targets = [ClassifierOutputTarget(int(c)) for c in LABELS]
    with cls(model=model, target_layers=[layer], **options) as extractor:
        extractor(input_tensor=x, targets=targets)
        recorded = extractor.activations_and_grads
        grads = recorded.gradients[0].numpy() if recorded.gradients else None
        raw = extractor.get_cam_image(x, layer, targets, recorded.activations[0].numpy(), grads, False)
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    return torch.from_numpy(np.asarray(raw, dtype=np.float32))


PGC_CASES = [
    ("eigen_grad_cam", EigenGradCAM, {}, {}, "layer3"),
    ("seg_eigen_cam", SegEigenCAM, {}, {}, "layer3"),
    ("grad_cam_element_wise", GradCAMElementWise, {}, {}, "layer3"),
    ("grad_cam_element_wise", GradCAMElementWise, {}, {}, "layer4"),
    ("kpca_cam", KPCA_CAM, {}, {}, "layer3"),
    ("kpca_cam", KPCA_CAM, {"kernel": "rbf", "gamma": 0.01}, {"kernel": "rbf", "gamma": 0.01}, "layer2"),
    ("kpca_cam", KPCA_CAM, {"kernel": "poly"}, {"kernel": "poly"}, "layer3"),
    ("fem", FEM, {}, {}, "layer2"),
    ("fem", FEM, {"k": 1}, {"k": 1.0}, "layer3"),
]


@pytest.mark.parametrize("name, cls, peer_options, options, layer", PGC_CASES)
def test_raw_maps_match_pytorch_grad_cam(name, cls, peer_options, options, layer):
    model, fn, params = peer_model("resnet18")
    x = _input()
    raw = _pgc_raw(cls, model, model.get_submodule(layer), x, **peer_options)
    ours = getattr(tx, name)(fn, params, x, LABELS, layer=layer, relu=False, upsample=False, **options)[:, 0]
    if name == "eigen_grad_cam":
        # LAPACK picks the singular vector's sign there; ours follows eigen_cam's rule (sum of v >= 0)
        sign = torch.sign((ours * raw).flatten(1).sum(1))[:, None, None]
        assert (sign != 0).all()
        raw = raw * sign
        _, act = tx.capture(fn, params, x, layer)
        grad = tx.layer_gradients(fn, params, x, LABELS, layers=[layer]).grads[layer]
        product = grad * act
        centred_sum = (product - product.mean(dim=(2, 3), keepdim=True)).sum(1)
        assert ((ours * centred_sum).flatten(1).sum(1) >= 0).all()
    if name == "fem":
        assert (ours != 0).any()
    assert_parity(ours, raw)


@pytest.fixture
def identity_scaling(monkeypatch):
    """pytorch-grad-cam's pipeline without its min-max scaling and resizing: it returns relu(raw)."""
    monkeypatch.setattr(pgc_base, "scale_cam_image", lambda cam, target_size=None: cam)


def _silu_resnet18():
    model, _, _ = peer_model("resnet18")
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.SiLU())
    return (model, *tx.functionalize(model))


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_shapley_cam_matches_pytorch_grad_cam(identity_scaling, activation):
    model, fn, params = peer_model("resnet18") if activation == "relu" else _silu_resnet18()
    x = _input()
    targets = [ClassifierOutputTarget(int(c)) for c in LABELS]
    with ShapleyCAM(model=model, target_layers=[model.layer3]) as extractor:
        ref = torch.from_numpy(np.asarray(extractor(input_tensor=x, targets=targets)))
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    ours = tx.shapley_cam(fn, params, x, LABELS, layer="layer3", upsample=False)[:, 0]
    assert_parity(ours, ref)
    grad_cam = tx.grad_cam(fn, params, x, LABELS, layer="layer3", upsample=False)[:, 0]
    if activation == "relu":   # piecewise linear after the layer: the Hessian term is 0
        assert_parity(grad_cam, ref)
    else:                      # SiLU: it is not
        assert (grad_cam - ref).abs().max() > 0.1 * ref.abs().max()


def test_finer_cam_matches_pytorch_grad_cam(identity_scaling):
    model, fn, params = peer_model("resnet18")
    x = _input()
    with FinerCAM(model=model, target_layers=[model.layer3]) as extractor:
        predicted = torch.from_numpy(np.asarray(extractor(input_tensor=x, targets=None, alpha=0.7)))
        given = torch.from_numpy(np.asarray(extractor(input_tensor=x, targets=None, alpha=0.3, target_idx=7,
                                                      comparison_categories=[1, 4])))
    model.zero_grad(set_to_none=True)
    assert_no_hooks(model)
    assert_parity(tx.finer_cam(fn, params, x, None, layer="layer3", upsample=False, alpha=0.7)[:, 0], predicted)
    assert_parity(tx.finer_cam(fn, params, x, 7, layer="layer3", upsample=False, alpha=0.3,
                               comparison=(1, 4))[:, 0], given)


def test_finer_cam_is_grad_cam_of_its_score():
    """The score by hand: the comparison classes of each example and the softmax-weighted difference."""
    model, fn, params = peer_model("resnet18")
    x = _input()
    logits = model(x).detach()
    own = logits.gather(1, LABELS[:, None])
    others = torch.argsort((logits - own).abs(), dim=1)[:, 1:3]
    assert (others != LABELS[:, None]).all()

    def score(out):
        p = torch.softmax(out, 1).gather(1, others)
        return (p * (out.gather(1, LABELS[:, None]) - 0.5 * out.gather(1, others))).sum(1) / (p.sum(1) + 1e-9)

    expected = tx.grad_cam_pp(fn, params, x, score, layer="layer4")
    got = tx.finer_cam(fn, params, x, LABELS, layer="layer4", alpha=0.5, comparison=(1, 2), method=tx.grad_cam_pp)
    torch.testing.assert_close(got, expected)


def test_refine_cam_matches_pytorch_grad_cam():
    """The whole pipeline of both (scaled maps at x's size), Grad-CAM++ and Grad-CAM as the method."""
    model, fn, params = peer_model("resnet18")
    x = _input()
    targets = [ClassifierOutputTarget(int(c)) for c in LABELS]
    for ours_method, peer_options in ((None, {}), (tx.grad_cam, {"base_method": GradCAM})):
        refine = RefineCAM(model, [model.layer2, model.layer3, model.layer4], **peer_options)
        ref = torch.from_numpy(np.asarray(refine(x, targets)))
        for base in refine.base_cam_per_layer:
            base.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        assert_no_hooks(model)
        ours = tx.refine_cam(fn, params, x, LABELS, layer=["layer2", "layer3", "layer4"], method=ours_method)
        assert_parity(ours[:, 0], ref)
    with pytest.raises(TypeError, match="refine_cam: .*layer"):
        tx.refine_cam(fn, params, x, LABELS, layer=[])


# torchcam's classes draw from the global generator; ours from a generator seeded alike. resnet18's layer1
# (64 channels, 16 x 16 at 64 x 64) keeps the masked forwards few.
TORCHCAM_CASES = [
    ("sscam", SSCAM, {"num_samples": 2, "std": 1.0, "batch_size": 64}, {"samples": 2, "std": 1.0, "batch_size": 48},
     "layer1"),
    ("iscam", ISCAM, {"num_samples": 2, "batch_size": 64}, {"samples": 2, "batch_size": 40}, "layer1"),
    ("smooth_grad_cam_pp", SmoothGradCAMpp, {"num_samples": 3, "std": 0.5}, {"samples": 3, "std": 0.5}, "layer3"),
    ("smooth_grad_cam_pp", SmoothGradCAMpp, {"num_samples": 2, "std": 0.2}, {"samples": 2, "std": 0.2}, "layer4"),
]


@pytest.mark.parametrize("name, cls, peer_options, options, layer", TORCHCAM_CASES)
def test_maps_match_torchcam(name, cls, peer_options, options, layer):
    model, fn, params = peer_model("resnet18")
    x = _input()
    torch.manual_seed(11)
    with cls(model, target_layer=layer, input_shape=(3, 64, 64), **peer_options) as extractor:
        scores = model(x)
        (ref,) = extractor(class_idx=LABELS.tolist(), scores=scores, normalized=False)
    ref = ref.detach()
    assert_no_hooks(model)
    if name != "iscam":
        options = dict(options, generator=torch.Generator().manual_seed(11))
    with torch.no_grad() if name != "smooth_grad_cam_pp" else torch.enable_grad():
        ours = getattr(tx, name)(fn, params, x, LABELS, layer=layer, upsample=False, **options)[:, 0]
    assert_parity(ours, ref)
    if name != "iscam":   # another seed, another map: the noise is really the peer's
        with torch.no_grad() if name != "smooth_grad_cam_pp" else torch.enable_grad():
            other = getattr(tx, name)(fn, params, x, LABELS, layer=layer, upsample=False,
                                      **dict(options, generator=torch.Generator().manual_seed(12)))[:, 0]
        assert (other - ref).abs().max() > 1e-3 * ref.abs().max()


# --------------------------------------------------------------------------------------------
# Closed forms on a linear head: features = x, score_c = sum_k W[c, k] mean_ij x_k + b_c, so
# g = W[c, k] / (H W) at every position.

def _linear_head():
    torch.manual_seed(0)
    model = LinearHead().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    target = torch.tensor([0, 3])
    g = model.fc.weight.detach()[target] / 24.0
    return model, fn, params, x, target, g


def test_closed_forms_on_a_linear_head():
    model, fn, params, x, target, g = _linear_head()
    call = dict(layer="features", relu=False, upsample=False)
    element_wise = torch.relu(g[:, :, None, None] * x).sum(1, keepdim=True)
    torch.testing.assert_close(tx.grad_cam_element_wise(fn, params, x, target, **call), element_wise)
    assert (element_wise != torch.einsum("bk,bkhw->bhw", g, x)[:, None]).any()   # not HiResCAM
    # no Hessian: ShapleyCAM is Grad-CAM
    torch.testing.assert_close(tx.shapley_cam(fn, params, x, target, **call), tx.grad_cam(fn, params, x, target,
                                                                                          **call))
    # no noise: Smooth Grad-CAM++ with alpha = g^2 / (2 g^2 + g^3 S + eps), S the channel's sum
    S = x.sum(dim=(2, 3))
    alpha = g ** 2 / (2 * g ** 2 + g ** 3 * S + 1e-8)
    expected = torch.einsum("bk,bkhw->bhw", alpha * torch.relu(g) * 24, x)[:, None]
    torch.testing.assert_close(tx.smooth_grad_cam_pp(fn, params, x, target, samples=3, std=0.0, **call), expected)
    # FEM: the share of positions above mean + k std, per channel
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True, unbiased=False)
    share = (x > mean + 0.5 * std).double().mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(tx.fem(fn, params, x, target, k=0.5, **call), (share * x).sum(1, keepdim=True))


def test_kpca_cam_with_a_linear_kernel_is_eigen_cam_up_to_sign():
    """Kernel PCA with <a, b> is PCA: the projection on the first component, the sign by largest magnitude."""
    _, fn, params, x, target, _ = _linear_head()
    call = dict(layer="features", relu=False, upsample=False)
    kpca = tx.kpca_cam(fn, params, x, target, kernel="linear", **call)
    eigen = tx.eigen_cam(fn, params, x, **call)
    sign = torch.sign((kpca * eigen).flatten(1).sum(1))[:, None, None, None]
    torch.testing.assert_close(kpca, eigen * sign)
    flat = kpca.flatten(1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()


def test_iscam_and_sscam_by_hand():
    """The weights from an explicit loop over the samples and channels."""
    torch.manual_seed(0)
    model = LinearHead().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    target = torch.tensor([1, 2])
    A = x.clone()   # features = x
    normed = (A - A.amin(dim=(2, 3), keepdim=True)) / (A.amax(dim=(2, 3), keepdim=True)
                                                      - A.amin(dim=(2, 3), keepdim=True) + 1e-8)
    base = model(x).gather(1, target[:, None])
    steps = 4
    coefficient = [sum(j / steps for j in range(1, s + 2)) for s in range(steps)]
    delta = torch.zeros(2, 3, dtype=torch.float64)
    for s in range(steps):
        for k in range(3):
            masked = coefficient[s] * normed[:, k:k + 1] * x
            delta[:, k] += (model(masked).gather(1, target[:, None]) - base)[:, 0].detach()
    w = torch.softmax(delta / steps, dim=1)
    expected = torch.einsum("bk,bkhw->bhw", w, A)[:, None]
    got = tx.iscam(fn, params, x, target, layer="features", samples=steps, batch_size=4, relu=False, upsample=False)
    torch.testing.assert_close(got, expected)
    # SS-CAM: the noise of each sample drawn as one [B, K, H, W] float32 draw
    gen = torch.Generator().manual_seed(3)
    delta = torch.zeros(2, 3, dtype=torch.float64)
    for s in range(2):
        noise = (torch.randn(2, 3, 4, 6, generator=gen) * 0.7).double()
        for k in range(3):
            masked = (normed[:, k:k + 1] + noise[:, k:k + 1]) * x
            delta[:, k] += (model(masked).gather(1, target[:, None]) - base)[:, 0].detach()
    expected = torch.einsum("bk,bkhw->bhw", torch.softmax(delta / 2, dim=1), A)[:, None]
    got = tx.sscam(fn, params, x, target, layer="features", samples=2, std=0.7, batch_size=16, relu=False,
                   upsample=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)


# --------------------------------------------------------------------------------------------
# Deep Feature Factorization.

def test_deep_feature_factorization_matches_pytorch_grad_cam_from_the_same_start():
    """pytorch-grad-cam's ``dff`` (scikit-learn's NMF) in float64 and ours, both from scikit-learn's start."""
    model, fn, params = peer_model("resnet18")
    x = _input()
    _, act = tx.capture(fn, params, x, "layer4")
    acts = act.detach().double().numpy()
    concepts, maps = dff(acts.copy(), n_components=3)
    X = acts.transpose(1, 0, 2, 3).reshape(acts.shape[1], -1)
    W0, H0 = _initialize_nmf(X - X.min(axis=1, keepdims=True), 3, init="random", random_state=0)
    got = tx.deep_feature_factorization(fn, params, x, layer="layer4", components=3, upsample=False,
                                        init=(torch.from_numpy(W0), torch.from_numpy(H0)), classifier=model.fc)
    assert_parity(got.maps, torch.from_numpy(maps).float())
    assert_parity(got.concepts, torch.from_numpy(concepts.T).float())
    torch.testing.assert_close(got.scores, model.fc(got.concepts))
    # the explanation maps reconstruct the centred activations: X - m ~ W H
    rebuilt = (got.concepts.double().T - torch.from_numpy(X.min(axis=1))[:, None]) @ \
        got.maps.double().transpose(0, 1).reshape(3, -1)
    error = (rebuilt - torch.from_numpy(X - X.min(axis=1, keepdims=True))).norm()
    start = (torch.from_numpy(W0 @ H0) - torch.from_numpy(X - X.min(axis=1, keepdims=True))).norm()
    assert error < 0.7 * start


def test_deep_feature_factorization_recovers_an_exact_factorisation_and_is_seeded():
    torch.manual_seed(0)
    model = LinearHead().double().eval()   # features = x: the factorised activations are x itself
    fn, params = tx.functionalize(model)
    W = torch.rand(3, 2, dtype=torch.float64)
    H = torch.rand(2, 2 * 5 * 6, dtype=torch.float64)
    H[0, :10] = 0   # non-negative, each channel's minimum 0 (so nothing is shifted)
    H[1, 10:20] = 0
    H[:, 20:25] = 0
    W[:, 0] = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    W[:, 1] = torch.tensor([0.0, 1.5, 1.0], dtype=torch.float64)
    X = W @ H
    x = X.reshape(3, 2, 5, 6).transpose(0, 1).contiguous()
    assert (X.amin(dim=1) == 0).all()
    got = tx.deep_feature_factorization(fn, params, x, layer="features", components=2, upsample=False,
                                        iterations=2000, tol=1e-12, generator=torch.Generator().manual_seed(0))
    rebuilt = got.concepts.T @ got.maps.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(rebuilt, X, atol=1e-6, rtol=1e-6)
    again = tx.deep_feature_factorization(fn, params, x, layer="features", components=2, upsample=False,
                                          iterations=2000, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.maps, got.maps)
    up = tx.deep_feature_factorization(fn, params, x, layer="features", components=2, iterations=2000, tol=1e-12,
                                       generator=torch.Generator().manual_seed(0))
    assert up.maps.shape == (2, 2, 5, 6) and up.scores is None


# --------------------------------------------------------------------------------------------
# Errors.

NAMES = ["eigen_grad_cam", "seg_eigen_cam", "grad_cam_element_wise", "fem", "kpca_cam", "finer_cam", "shapley_cam",
         "sscam", "iscam", "smooth_grad_cam_pp"]


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_function(name):
    _, fn, params, x, target, _ = _linear_head()
    with pytest.raises(ValueError, match=f"{name}: unknown layer"):
        getattr(tx, name)(fn, params, x, target, layer="featurez")
    with pytest.raises(TypeError, match=name):
        getattr(tx, name)(fn, params, x.long(), target, layer="features")


def test_option_errors():
    _, fn, params, x, target, _ = _linear_head()
    cases = [
        (tx.fem, {"k": "2"}, TypeError, "fem: .*k"),
        (tx.kpca_cam, {"kernel": "laplace"}, ValueError, "kpca_cam: .*kernel"),
        (tx.kpca_cam, {"gamma": -1.0}, ValueError, "kpca_cam: .*gamma"),
        (tx.finer_cam, {"comparison": (0,)}, ValueError, "finer_cam: .*comparison"),
        (tx.finer_cam, {"comparison": (9,)}, ValueError, "finer_cam: .*comparison ranks below the class count 4"),
        (tx.sscam, {"std": -1.0}, ValueError, "sscam: .*std"),
        (tx.sscam, {"samples": 0}, ValueError, "sscam: .*samples"),
        (tx.iscam, {"layer": ["features"]}, TypeError, "iscam: .*one layer"),
        (tx.smooth_grad_cam_pp, {"generator": 3}, TypeError, "smooth_grad_cam_pp: .*generator"),
    ]
    for method, options, error, match in cases:
        with pytest.raises(error, match=match):
            method(fn, params, x, target, **{"layer": "features", **options})
    with pytest.raises(TypeError, match="finer_cam: .*target"):
        tx.finer_cam(fn, params, x, lambda out: out[:, 0], layer="features")
    with pytest.raises(ValueError, match="deep_feature_factorization: .*components"):
        tx.deep_feature_factorization(fn, params, x, layer="features", components=0)
    with pytest.raises(ValueError, match="deep_feature_factorization: .*init"):
        tx.deep_feature_factorization(fn, params, x, layer="features", components=2,
                                      init=(torch.ones(3, 2), -torch.ones(2, 60)))
