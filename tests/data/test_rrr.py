"""Training with explanations: the decoy data set, Right for the Right Reasons, MAML through Grad-CAM.

The training tests run the examples' own code (``examples/right_for_right_reasons.py``,
``examples/maml_explanation.py``) at reduced size with fixed seeds.
"""
import importlib.util
import pathlib
import sys

import pytest
import torch

from torchex_fn.data import PALETTE, decoy_shapes

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _example(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))   # maml_explanation imports right_for_right_reasons
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The data set.

def test_decoy_patch_reveals_the_label_in_train_only():
    train = decoy_shapes(64, split="train", seed=0, size=32)
    test = decoy_shapes(64, split="test", seed=1, size=32)
    assert torch.equal(train.decoys, train.labels)
    assert (test.decoys != test.labels).float().mean() > 0.5          # independent: about 3/4 differ
    for data in (train, test):
        blocked = ~data.allowed                                        # [N, 1, 32, 32]
        assert torch.equal(blocked.sum(dim=(1, 2, 3)), torch.full((64,), 16))   # a 4 x 4 patch ...
        corners = blocked[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]        # ... in exactly one corner
        assert torch.equal(corners.sum(1), torch.ones(64, dtype=torch.long))
        colour = torch.tensor(PALETTE)[data.decoys]                    # [N, 3]
        on_patch = data.images.permute(0, 2, 3, 1)[blocked[:, 0]].view(64, 16, 3)
        assert torch.equal(on_patch, colour[:, None].expand(64, 16, 3))
        assert not (data.masks & blocked).any()


def test_decoy_is_deterministic_and_keeps_the_base_images():
    a = decoy_shapes(16, split="test", seed=3, size=32)
    b = decoy_shapes(16, split="test", seed=3, size=32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    train = decoy_shapes(16, split="train", seed=3, size=32)
    assert torch.equal(train.labels, a.labels) and torch.equal(train.allowed, a.allowed)
    assert torch.equal(train.images * train.allowed, a.images * a.allowed)   # only the patch colour differs


@pytest.mark.parametrize("kwargs, error", [(dict(split="val"), ValueError), (dict(split=1), TypeError),
                                           (dict(patch=9), ValueError), (dict(patch=2.0), TypeError)])
def test_decoy_errors(kwargs, error):
    with pytest.raises(error, match="decoy_shapes: "):
        decoy_shapes(4, size=32, **kwargs)


# --------------------------------------------------------------------------------------------
# MAML through Grad-CAM: the outer gradient holds third derivatives of the model.

def test_maml_gradcam_outer_gradient_matches_finite_differences_float64():
    maml = _example("maml_explanation")
    for name, index in (("features.0.weight", (0, 0, 1, 1)), ("stem.0.weight", (1, 2, 0, 1)), ("fc.bias", (2,))):
        auto, fd = maml.finite_difference_check(name=name, index=index)
        assert auto.dtype == torch.float64
        torch.testing.assert_close(auto, fd, rtol=1e-6, atol=1e-9)


def test_maml_check_detects_a_dropped_higher_order_path():
    """The finite-difference comparison is sharp enough to see first-order MAML (inner gradient detached)."""
    maml = _example("maml_explanation")
    model_fn, params, support, query = maml.tiny_problem()
    alpha, lam = 0.5, 1.0

    def first_order(p):
        g = torch.func.grad(maml.task_loss)(p, model_fn, *support, lam)
        adapted = {k: v - alpha * g[k].detach() for k, v in p.items()}
        return maml.task_loss(adapted, model_fn, *query, lam)

    wrong = torch.func.grad(first_order)(params)["features.0.weight"][0, 0, 1, 1]
    auto, fd = maml.finite_difference_check()
    assert abs(wrong - fd) > 1e3 * abs(auto - fd)


# --------------------------------------------------------------------------------------------
# Right for the Right Reasons, end to end (reduced sizes, fixed seeds).

SIZES = dict(size=32, difficulty=0.0)
TRAIN = dict(epochs=6, batch_size=32, lr=3e-3, width=16, seed=0)
PENALISED = dict(TRAIN, epochs=10)
# Margins (points of accuracy / agreement, 512 test images) measured at seeds 0-4 of TRAIN["seed"]:
#   plain: clean accuracy >= 0.8: +19 to +20; accuracy <= clean - 0.25: +41 to +49; agreement >= 0.7: +14 to +27.
#   penalised, 10 epochs: accuracy >= clean - 0.1: +7.1 to +9.4; agreement <= 0.4: +11.7 to +15.2
#   (seed 0, the one the test runs: +8.6 and +14.4).
# Before (6 epochs for the penalised model, accuracy >= clean - 0.05, agreement >= 0.8) seed 0 passed by
# +1.7 and +4.0 and the penalised test failed at seeds 1-4 (its accuracy 0.63 / 0.82 / 0.94 / 0.88):
# six epochs were not enough for the penalised model to converge.


@pytest.fixture(scope="module")
def rrr():
    torch.set_num_threads(2)
    return _example("right_for_right_reasons")


@pytest.fixture(scope="module")
def decoy_data():
    return (decoy_shapes(1024, split="train", seed=0, **SIZES),
            decoy_shapes(1024, split="test", seed=0, **SIZES),          # decoy-free: the patch is random
            decoy_shapes(512, split="test", seed=10_000, **SIZES))


@pytest.fixture(scope="module")
def clean_accuracy(rrr, decoy_data):
    _, clean, test = decoy_data
    return rrr.evaluate(*rrr.train(clean, **TRAIN), test)[0]


@pytest.mark.slow  # ~7 s alone on 2 cores; measured 155 s under heavy contention from other jobs
def test_plain_model_learns_the_decoy(rrr, decoy_data, clean_accuracy):
    train, _, test = decoy_data
    accuracy, agreement = rrr.evaluate(*rrr.train(train, **TRAIN), test)
    assert clean_accuracy >= 0.8
    assert accuracy <= clean_accuracy - 0.25
    assert agreement >= 0.7            # on the test split it follows the (random) patch (chance: 0.25)


@pytest.mark.slow  # alone ~50 s on 1 thread (10 epochs of 1024 at 5.5x a plain step); minutes under contention
def test_input_gradient_penalty_recovers(rrr, decoy_data, clean_accuracy):
    """The paper's penalty (input gradient of sum_k log p_k, on the patch) unlearns the decoy."""
    train, _, test = decoy_data
    accuracy, agreement = rrr.evaluate(*rrr.train(train, method="saliency", lam=0.5, **PENALISED), test)
    assert accuracy >= clean_accuracy - 0.1
    assert agreement <= 0.4            # no longer follows the patch (chance: 0.25)
