"""Ablation-CAM's full-forward path does not run the ablated layer itself: its output is replaced whole.

The path of full forwards (a callable target of several images, a detector) used to run the layer and then
discard its output; ``core.model.skipped`` makes the layer return the ablated copy directly. The maps are the
same as when the layer runs, the layer runs once (the clean forward), and nothing of it is left on the model.
"""
import contextlib

import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.methods import cam as _cam


class Counted(nn.Conv2d):
    """A convolution that counts its forwards (no hook: a hook would keep it running)."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Counted(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double().eval()
    return model, torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _score(out):
    """A callable target of two images: full forwards, blocks laid out like x."""
    return out[:, 0] + 2 * out[:, 2]


def test_the_ablated_layer_does_not_run_and_the_maps_are_unchanged(monkeypatch):
    model, x = _model()
    fn, params = tx.functionalize(model)
    Counted.calls = 0
    ours = tx.ablation_cam(fn, params, x, _score, layer="2", batch_size=4, relu=False, upsample=False)
    assert Counted.calls == 1                     # the clean forward only; 12 ablated rows in 3 forwards skip it
    assert "forward" not in model[2].__dict__
    monkeypatch.setattr(_cam, "skipped", lambda *args: contextlib.nullcontext())
    Counted.calls = 0
    running = tx.ablation_cam(fn, params, x, _score, layer="2", batch_size=4, relu=False, upsample=False)
    assert Counted.calls == 1 + 3
    torch.testing.assert_close(ours, running, rtol=1e-12, atol=1e-12)


def test_a_hook_inside_keeps_the_layer_running():
    model, x = _model()
    fn, params = tx.functionalize(model)
    seen = []
    handle = model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        Counted.calls = 0
        tx.ablation_cam(fn, params, x, _score, layer="2", batch_size=4)
    finally:
        handle.remove()
    assert Counted.calls == 4 and seen == [2, 4, 4, 4]


def test_vmap_over_parameters_equals_the_loop():
    """The swapped forward returns a batched tensor under vmap: two parameter sets at once equal a loop."""
    model, x = _model()
    fn, params = tx.functionalize(model)
    stacked = {k: torch.stack([v, v * 1.1]) for k, v in params.items()}

    def cam(p):
        return tx.ablation_cam(fn, p, x, _score, layer="2", batch_size=4, relu=False, upsample=False)
    Counted.calls = 0
    batched = torch.func.vmap(cam)(stacked)
    assert Counted.calls == 1
    loop = torch.stack([cam({k: s[i] for k, s in stacked.items()}) for i in range(2)])
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
    assert "forward" not in model[2].__dict__


def test_a_global_module_hook_keeps_the_layer_running():
    model, x = _model()
    fn, params = tx.functionalize(model)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        Counted.calls = 0
        tx.ablation_cam(fn, params, x, _score, layer="2", batch_size=4)
    finally:
        handle.remove()
    assert Counted.calls == 4 and calls.count("Counted") == 4
