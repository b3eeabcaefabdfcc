"""A layer's input as the layer (``layer="<module>:input"``, captum's ``attribute_to_layer_input=True``, issue 20):
every layer method reads, replaces and perturbs the tensor a module is called with, equal to captum's layer
classes with ``attribute_to_layer_input=True``; on a hand-weighted model the input of a linear layer is the
activation before it."""
import pytest
import torch
from torch import nn

import torchex_fn as tx

captum_attr = pytest.importorskip("captum.attr")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([1, 5])


def test_resnet_layer_methods_equal_captum_on_the_layer_input(resnet):
    model, x, t = resnet
    fn, params = tx.functionalize(model)
    cases = [
        (captum_attr.LayerIntegratedGradients(model, model.layer4).attribute(x, target=t, n_steps=8,
                                                                             attribute_to_layer_input=True),
         tx.integrated_gradients(fn, params, x, t, layer="layer4:input", steps=8), 1e-5),
        (captum_attr.LayerGradientXActivation(model, model.layer4).attribute(x, target=t,
                                                                             attribute_to_layer_input=True),
         tx.input_x_gradient(fn, params, x, t, layer="layer4:input"), 1e-6),
        (captum_attr.LayerConductance(model, model.layer4).attribute(x, target=t, n_steps=8,
                                                                     attribute_to_layer_input=True),
         tx.layer_conductance(fn, params, x, t, layer="layer4:input", steps=8), 1e-5),
        (captum_attr.LayerGradCam(model, model.layer4).attribute(x, target=t, attribute_to_layer_input=True),
         tx.grad_cam(fn, params, x, t, layer="layer4:input", upsample=False, relu=False), 1e-6),
    ]
    for ref, ours, tol in cases:
        assert ours.shape == ref.shape == (2, 256, 4, 4) or ours.shape == ref.shape == (2, 1, 4, 4)
        assert _rel(ours.detach(), ref.detach()) <= tol
    out, act = tx.capture(fn, params, x, "layer4:input")
    torch.testing.assert_close(act, model.layer3(model.layer2(model.layer1(
        model.maxpool(model.relu(model.bn1(model.conv1(x))))))), rtol=0, atol=0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(16, 8)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.flat(self.pool(self.relu1(self.conv(x)))))))


def test_deeplift_and_feature_ablation_on_a_layer_input_equal_captum():
    torch.manual_seed(2)
    model = _Net().eval()
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 2, 1])
    fn, params = tx.functionalize(model)
    ref = captum_attr.LayerDeepLift(model, model.fc2).attribute(x, target=t, attribute_to_layer_input=True)
    ours = tx.deeplift(fn, params, x, t, layer="fc2:input")
    assert ours.shape == ref.shape == (3, 8)
    assert _rel(ours.detach(), ref.detach()) <= 1e-5
    ref = captum_attr.LayerFeatureAblation(model, model.fc1).attribute(x, target=t, attribute_to_layer_input=True)
    ours = tx.feature_ablation(fn, params, x, t, layer="fc1:input")
    assert ours.shape == ref.shape == (3, 16)
    assert _rel(ours.detach(), ref.detach()) <= 1e-5


def test_hand_weighted_input_of_a_linear_layer():
    lin1, lin2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 3.0]]))
        lin2.weight.copy_(torch.tensor([[2.0, -1.0]]))
    model = nn.Sequential(lin1, nn.Tanh(), lin2)
    fn, params = tx.functionalize(model)
    x = torch.tensor([[0.5, -0.25]])
    h = torch.tanh(x @ lin1.weight.T)                       # the input of layer "2"
    sal = tx.saliency(fn, params, x, 0, layer="2:input", abs=False)
    torch.testing.assert_close(sal, torch.tensor([[2.0, -1.0]]))          # d out / d h = lin2's weights
    ixg = tx.input_x_gradient(fn, params, x, 0, layer="2:input")
    torch.testing.assert_close(ixg, h * torch.tensor([[2.0, -1.0]]))
    # the output of "1" and the input of "2" are the same tensor here: the same attribution
    torch.testing.assert_close(tx.input_x_gradient(fn, params, x, 0, layer="1"), ixg)


def test_errors_and_the_untouched_model():
    model = _Net().eval()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="fc3"):
        tx.input_x_gradient(fn, params, x, 0, layer="fc3:input")

    def plain(p, x):
        return torch.func.functional_call(model, p, (x,))
    with pytest.raises(TypeError, match="functionalize"):
        tx.input_x_gradient(plain, params, x, 0, layer="fc2:input")
    tx.integrated_gradients(fn, params, x, 0, layer="fc2:input", steps=4)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
