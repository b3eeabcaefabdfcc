import torch
from torch import nn

import torchex_fn as tx
from support.models import central_difference, smooth_double, TinyCNN
from support import reference as _reference


def test_saliency_of_linear_model_is_the_weight_row():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    target = torch.tensor([1, 3, 0])
    expected = model[1].weight[target].detach().view(3, 3, 2, 2)
    torch.testing.assert_close(tx.saliency(fn, params, x, target), expected)
    torch.testing.assert_close(tx.saliency(fn, params, -x, target, abs=True), expected.abs())
    torch.testing.assert_close(tx.input_x_gradient(fn, params, x, target), x * expected)
    # post_process runs last, on the signed gradient unless abs=True
    torch.testing.assert_close(tx.saliency(fn, params, x, target, post_process=lambda g: g * 2), 2 * expected)


def test_saliency_matches_autograd_oracle_with_predicted_class():
    model = TinyCNN(nn.ReLU).eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(4, 3, 8, 8)
    predicted = model(x).argmax(1)
    torch.testing.assert_close(tx.saliency(fn, params, x), _reference.saliency(model, x, predicted))


def test_simple_gradient_class_with_seed_post_process():
    model = TinyCNN().eval()

    def normalize_gradient(gradient):
        _, _, w, h = gradient.shape
        return w * h * gradient / gradient.sum()

    gen = tx.SimpleGradient(model, post_process=normalize_gradient)
    x = torch.randn(2, 3, 8, 8)
    fn, params = tx.functionalize(model)
    torch.testing.assert_close(gen(x, 2), normalize_gradient(tx.saliency(fn, params, x, 2)))
    torch.testing.assert_close(gen(x), normalize_gradient(tx.saliency(fn, params, x)))


def test_saliency_gradcheck_wrt_input_and_params():
    model, fn, params = smooth_double(nn.Tanh)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 3])
    torch.autograd.gradcheck(lambda x: tx.saliency(fn, params, x, target), (x,))
    torch.autograd.gradgradcheck(lambda x: tx.saliency(fn, params, x, target), (x,))
    w = params["conv1.weight"].clone().requires_grad_(True)

    def of_weight(w):
        return tx.saliency(fn, {**params, "conv1.weight": w}, x.detach(), target)
    torch.autograd.gradcheck(of_weight, (w,))
    torch.autograd.gradgradcheck(of_weight, (w,))


def test_func_grad_of_saliency_loss_wrt_params_equals_finite_differences():
    model, fn, params = smooth_double(nn.Tanh)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)

    def loss(p):
        return (tx.saliency(fn, p, x, torch.tensor([0, 2])) ** 2).sum()
    grads = torch.func.grad(loss)(params)
    name = "fc.weight"
    for idx in [(0, 0), (2, 5), (4, 3)]:
        fd = central_difference(loss, params, name, idx)
        torch.testing.assert_close(grads[name][idx], fd, rtol=1e-5, atol=1e-9)
    assert grads["conv1.weight"].abs().sum() > 0


def test_second_graph_only_when_something_outside_can_differentiate():
    """The backward records a graph of itself only when an outer derivative may need it."""
    model = TinyCNN(nn.Tanh).double().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert not tx.saliency(fn, params, x, 1).requires_grad          # nothing tracked: no second graph
    assert tx.saliency(fn, params, x.clone().requires_grad_(), 1).requires_grad

    # A model_fn that closes over the module's own parameters (they require grad): plain autograd
    # through the map must reach them, and equal create_graph=True autograd.
    closure = lambda p, x: model(x)
    sal = tx.saliency(closure, {}, x, torch.tensor([1, 2]))
    assert sal.requires_grad
    (g,) = torch.autograd.grad(sal.pow(2).sum(), model.conv1.weight)
    xx = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(model(xx).gather(1, torch.tensor([[1], [2]])).sum(), xx, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), model.conv1.weight)
    torch.testing.assert_close(g, g_ref)
