"""Hand-weighted and tiny models whose answers are known on paper or cheap to check."""
import pytest
import torch
from torch import nn

import torchex_fn as tx


class TinyCNN(nn.Module):
    """conv(3->4, 3x3) -> act -> conv(4->6, 3x3) -> act -> GAP -> linear(6->5); ``features`` is the last conv block."""

    def __init__(self, act: type = nn.Tanh, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = act()
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), act())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        h = self.features(self.act1(self.conv1(x)))
        return self.fc(self.pool(h).flatten(1))


class TinyAttention(nn.Module):
    """conv -> ``features`` -> tokens -> layer norm -> self-attention -> MLP -> mean -> ``fc`` (5 classes).

    ``shared`` is ``mlp[0]``: one ``Linear`` registered under two names.
    """

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.GELU()
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.GELU())
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.shared = self.mlp[0]
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        tokens = self.features(self.act1(self.conv1(x))).flatten(2).transpose(1, 2)   # [B, HW, 6]
        h = self.norm(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(tokens)
        return self.fc(tokens.mean(1))


class LinearHead(nn.Module):
    """Features are the input itself: ``out = W · mean_ij(x) + b``; Grad-CAM and CAM have closed forms."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.features = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.arange(channels * classes, dtype=torch.float32).view(classes, channels) - 5.0)
            self.fc.bias.copy_(torch.arange(classes, dtype=torch.float32))

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def tapped_mlp(params, x):
    """A hand-written model_fn that names its hidden layer with ``tx.tap``: ``out = 4 * tanh(x W1) W2``."""
    h = tx.tap("hidden", torch.tanh(x @ params["w1"]))
    return tx.tap("scaled", 4.0 * h) @ params["w2"]


def smooth_double(act: type = nn.Tanh):
    """A float64 ``TinyCNN`` with a smooth activation (finite differences need no kinks), functionalized."""
    model = TinyCNN(act).double().eval()
    return (model, *tx.functionalize(model))


def central_difference(loss, params, name, index, eps=1e-6):
    """``d loss / d params[name][index]`` by a central finite difference."""
    bump = torch.zeros_like(params[name])
    bump[index] = eps
    return (loss({**params, name: params[name] + bump}) - loss({**params, name: params[name] - bump})) / (2 * eps)


def torchvision_lrp_model(arch, dtype=torch.float32, zero_shifts=False):
    """A seeded torchvision model (``num_classes=10``, eval) with non-trivial batch-norm statistics and affine
    parameters, as the LRP and concept tests compare it with zennit / zennit-crp (and as
    ``tests/references/crp_reference.py`` builds it). ``eps = 0``: zennit's batch-norm merge is then the model
    itself. ``zero_shifts``: batch-norm means and biases and the classifier's bias zero (conservation tests)."""
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.eps = 0.0
                if zero_shifts:
                    m.running_mean.zero_()
                    m.bias.zero_()
        if zero_shifts and hasattr(model, "fc"):
            model.fc.bias.zero_()
    return model
