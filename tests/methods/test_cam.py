import torch
from torch import nn

import torchex_fn as tx
from support.models import central_difference, smooth_double, LinearHead, TinyCNN
from support import reference as _reference


def test_grad_cam_of_linear_head_has_closed_form():
    # features = x, score_c = sum_k W[c,k] mean_ij x_k + b_c  =>  weights_k = W[c,k] / (H W)
    model = LinearHead().double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    target = torch.tensor([0, 3])
    W = model.fc.weight.detach()
    raw = torch.einsum("bk,bkhw->bhw", W[target] / 24.0, x)[:, None]
    got = tx.grad_cam(fn, params, x, target, layer="features", upsample=False, relu=False)
    torch.testing.assert_close(got, raw)
    torch.testing.assert_close(tx.grad_cam(fn, params, x, target, layer="features"), raw.clamp_min(0))
    # CAM on the same model: sum_k W[c,k] x_k, i.e. H W times the Grad-CAM map
    torch.testing.assert_close(tx.cam(fn, params, x, target, layer="features", fc="fc"), raw * 24.0)
    torch.testing.assert_close(tx.cam(fn, params, x, target, layer="features", fc=model.fc.weight.detach(), relu=True),
                               (raw * 24.0).clamp_min(0))


def test_cam_spatial_mean_plus_bias_is_the_logit():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8)
    maps = tx.cam(fn, params, x, layer="features", upsample=False)  # default fc: last nn.Linear
    out = model(x)
    predicted = out.argmax(1)
    torch.testing.assert_close(maps.mean(dim=(1, 2, 3)) + model.fc.bias[predicted], out.max(1).values)


def test_grad_cam_matches_hook_oracle_and_upsamples_bilinear():
    model = TinyCNN(nn.ReLU).eval()
    model.features.add_module("2", nn.MaxPool2d(2))
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 12, 12)
    target = torch.tensor([0, 4, 2])
    expected = _reference.grad_cam(model, model.features, x, target)
    got = tx.grad_cam(fn, params, x, target, layer=model.features)
    assert got.shape == (3, 1, 12, 12)
    torch.testing.assert_close(got, expected)
    assert got.abs().max() > 1e-4


def test_several_layers_in_one_call_equal_single_calls():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    one = [tx.grad_cam(fn, params, x, 1, layer=name) for name in ("conv1", "features")]
    both = tx.grad_cam(fn, params, x, 1, layer=["conv1", "features"])
    keyed = tx.grad_cam(fn, params, x, 1, layer={"a": "conv1", "b": model.features})
    for a, b in zip(one, both):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(keyed["b"], one[1], rtol=0, atol=0)
    stacked = tx.GradCAM(model, target_layer=[model.conv1, model.features])(x, 1)
    assert stacked.shape == (2, 2, 1, 8, 8)
    torch.testing.assert_close(stacked, torch.stack(one))


def test_seed_classes_bind_options():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(tx.CAM(model, target_layer=model.features, fc_layer=model.fc)(x, 3),
                               tx.cam(fn, params, x, 3, layer="features", fc="fc"))
    torch.testing.assert_close(tx.GradCAM(model, target_layer=model.features)(x),
                               tx.grad_cam(fn, params, x, layer="features"))


def test_grad_cam_gradcheck_wrt_input_and_params():
    _, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 3])
    f = lambda x: tx.grad_cam(fn, params, x, target, layer="features", relu=False)
    torch.autograd.gradcheck(f, (x,))
    torch.autograd.gradgradcheck(f, (x,))
    for name in ("fc.weight", "features.0.weight"):
        w = params[name].clone().requires_grad_(True)
        g = lambda w: tx.grad_cam(fn, {**params, name: w}, x.detach(), target, layer="features", relu=False)
        torch.autograd.gradcheck(g, (w,))
        torch.autograd.gradgradcheck(g, (w,))


def test_func_grad_of_grad_cam_reaches_fc_weights_and_matches_finite_differences():
    _, fn, params = smooth_double(nn.Softplus)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :] = 1.0

    def loss(p):
        return (tx.grad_cam(fn, p, x, torch.tensor([0, 2]), layer="features") * mask).pow(2).sum()
    grads = torch.func.grad(loss)(params)
    assert grads["fc.weight"].abs().sum() > 0  # captum's LayerGradCam gives none without create_graph
    for name, idx in [("fc.weight", (0, 1)), ("features.0.weight", (1, 2, 0, 1)), ("conv1.bias", (3,))]:
        fd = central_difference(loss, params, name, idx)
        torch.testing.assert_close(grads[name][idx], fd, rtol=1e-5, atol=1e-9)
