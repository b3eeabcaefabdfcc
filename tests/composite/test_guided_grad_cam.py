"""guided_grad_cam: parity with captum's GuidedGradCam (both resize modes), the product written out, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx
from support.parity import assert_no_hooks, assert_parity

# captum warns that it set requires_grad on the inputs and that it hooks the ReLUs: its own notes
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]

captum_attr = pytest.importorskip("captum.attr")


def _cnn():
    """A small CNN whose head is scaled up (x 30), so that the maps, a product of two gradients, are O(1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[6].weight.mul_(30.0)
    return model


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("layer", ["2", "3"])
def test_parity_with_captum(mode, layer):
    model = _cnn()
    fn, params = tx.functionalize(model)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2])
    ref = captum_attr.GuidedGradCam(model, dict(model.named_modules())[layer]).attribute(x, target,
                                                                                        interpolate_mode=mode)
    assert_parity(tx.guided_grad_cam(fn, params, x, target, layer=layer, interpolate_mode=mode), ref)
    assert_no_hooks(model)


def test_is_guided_backprop_times_the_resized_grad_cam():
    model = _cnn().double()
    fn, params = tx.functionalize(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    cam = tx.grad_cam(fn, params, x, 1, layer="3", upsample=False)             # [2, 1, 4, 4]
    expected = tx.guided_backprop(fn, params, x, 1) * cam.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(tx.guided_grad_cam(fn, params, x, 1, layer="3"), expected, rtol=0, atol=0)
    bilinear = tx.guided_backprop(fn, params, x, 1) * F.interpolate(cam, size=(8, 8), mode="bilinear")
    torch.testing.assert_close(tx.guided_grad_cam(fn, params, x, 1, layer="3", interpolate_mode="bilinear"),
                               bilinear, rtol=0, atol=0)


def test_errors():
    fn, params = tx.functionalize(_cnn())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^guided_grad_cam: .*interpolate_mode"):
        tx.guided_grad_cam(fn, params, x, 0, layer="3", interpolate_mode="cubic")
    with pytest.raises(TypeError, match=r"^guided_grad_cam: expected interpolate_mode"):
        tx.guided_grad_cam(fn, params, x, 0, layer="3", interpolate_mode=1)
    with pytest.raises(ValueError, match=r"^grad_cam: "):
        tx.guided_grad_cam(fn, params, x, 0, layer="nope")
