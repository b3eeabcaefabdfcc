"""tx.metrics.input_invariance: gradients pass and input x gradient fails on a model whose first layer undoes
the shift exactly; the bias rule against Quantus's, by hand."""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn import metrics


def mlp():
    torch.manual_seed(0)
    return tx.functionalize(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval())


def unpadded_cnn():
    torch.manual_seed(1)
    return tx.functionalize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
                            .double().eval())


@pytest.mark.parametrize("model, shape", [(mlp, (5, 4)), (unpadded_cnn, (5, 3, 6, 6))])
def test_gradients_pass_and_input_x_gradient_fails(model, shape):
    fn, params = model()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert metrics.input_invariance(tx.saliency, fn, params, x, first_layer="0").all()
    assert not metrics.input_invariance(tx.input_x_gradient, fn, params, x, first_layer="0").any()
    # with no shift, every method passes
    assert metrics.input_invariance(tx.input_x_gradient, fn, params, x, first_layer="0", input_shift=0.0).all()


def test_the_shifted_model_equals_the_model_and_quantus_bias_does_not():
    fn, params = unpadded_cnn()
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    shift = -1.0
    w, b = params["0.weight"], params["0.bias"]
    ours = dict(params, **{"0.bias": b - shift * w.sum(dim=(1, 2, 3))})            # the rule of input_invariance
    torch.testing.assert_close(fn(ours, x + shift), fn(params, x))
    # Quantus: bias = 2 b - min(conv(shift image)); with a padded first layer the minimum is a border value
    padded = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        padded.weight.copy_(w)
        padded.bias.copy_(b)
        response = padded(torch.full((1, 3, 6, 6), shift, dtype=torch.float64))[0]
        quantus_bias = 2 * b - response.flatten(1).min(dim=1).values
        interior = response[:, 3, 3]                                               # = b + shift * W.sum
    torch.testing.assert_close(interior, b + shift * w.sum(dim=(1, 2, 3)))
    assert not torch.allclose(quantus_bias, b - shift * w.sum(dim=(1, 2, 3)))


def test_bad_arguments():
    fn, params = mlp()
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="input_invariance: unknown first_layer"):
        metrics.input_invariance(tx.saliency, fn, params, x, first_layer="1")
    with pytest.raises(TypeError, match="input_invariance: expected input_shift, a number"):
        metrics.input_invariance(tx.saliency, fn, params, x, first_layer="0", input_shift="-1")
