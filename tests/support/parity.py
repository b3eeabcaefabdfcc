"""The peer-parity tests' models, input and checks (tests/test_parity.py, tests/methods/test_cam_*.py).

The tolerance rule of :func:`assert_parity` is explained in tests/test_parity.py's docstring.
"""
import torch
import torchvision

import torchex_fn as tx

RTOL = 1e-5
BATCH = 3
SIZE = 64
MODEL_SEED = 1234
INPUT_SEED = 4321

_CACHE = {}


def peer_model(name):
    """A randomly initialised torchvision model in eval mode, built once per session, seeded.

    At torchvision's initialisation, BatchNorm in eval mode is the identity (mean 0, var 1), and
    mobilenet_v3_small's activations then shrink ~10x per stage (logits ~1e-9, input gradients
    ~1e-11): nearly linear, and a weak test. So the BatchNorm statistics are calibrated once on a
    random batch (train-mode forward, cumulative average), as a trained model's would be: every
    layer then carries O(1) activations, and BatchNorm has non-zero effective biases.
    """
    if name not in _CACHE:
        torch.manual_seed(MODEL_SEED)
        model = getattr(torchvision.models, name)(weights=None)
        calibrate_batchnorm(model, torch.randn(16, 3, SIZE, SIZE))
        fn, params = tx.functionalize(model)
        _CACHE[name] = (model, fn, params)
    return _CACHE[name]


def calibrate_batchnorm(module, batch):
    """BatchNorm statistics of one batch (a train-mode forward with a cumulative average: running stats =
    this batch's stats, O(1) like a trained model's), then eval mode."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        module.train()(batch)
    module.eval()


def state_of(model):
    """What a call must leave as it was: the state dict's values and the training flag."""
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def assert_same_state(model, before):
    """``model`` as :func:`state_of` recorded it, with no hook left and no ``.grad`` written."""
    state, training = before
    assert model.training == training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


def peer_input():
    g = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g)


def assert_nontrivial(ref):
    """The reference has a real magnitude and is not constant, so parity is not vacuous."""
    ref = torch.as_tensor(ref)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max()
    assert scale > 1e-4, f"reference map is (almost) zero: max |ref| = {scale}"
    # Not one constant across the batch. (A single example's ReLU'd map may legitimately be all
    # zero: a class with only negative evidence at a 2x2 layer.)
    assert ref.max() - ref.min() > 1e-3 * scale, "the reference maps are constant"


def assert_parity(ours, ref, rtol=RTOL):
    """``|ours - ref| <= rtol * |ref| + rtol * max|ref|`` (see tests/test_parity.py's docstring)."""
    ref = torch.as_tensor(ref)
    assert_nontrivial(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def assert_no_hooks(model):
    """Peers register hooks on the shared model; make sure they took them all away again."""
    for name, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), name
