"""Reference values of Quantus 0.6.0 for the faithfulness metrics of ``tx.metrics``.

Run once, in the environment that has Quantus (see ``quantus/README.md``), after ``quantus_reference.py``::

    /work/quantusenv/bin/python tests/references/quantus_faithfulness_reference.py

It reads the CNN, images and classes of ``quantus/reference.pt``, computes per-channel maps (``tx.saliency`` and
``tx.integrated_gradients``, ``[8, 3, 16, 16]``: no ties between the copies of a pixel, so Quantus's unstable
``argsort`` and ours rank alike) and writes ``quantus/faithfulness.pt`` with what Quantus computes on them.
Quantus is called with ``batch_size=1`` (one example per ``evaluate_batch``: its values per example); its
batch-wide normalisation does not change these metrics (rankings, correlations, or ``normalise=False``).
Where Quantus draws at random (faithfulness correlation) the script records the subsets it drew (a perturbation
function that notes its ``indices``), so the test feeds ours the same ones. ``tests/evaluation/
test_quantus_faithfulness.py`` reads the file; it never imports Quantus.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import quantus  # noqa: E402
from quantus.functions.perturb_func import batch_baseline_replacement_by_indices  # noqa: E402

import torchex_fn as tx  # noqa: E402

if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
    np.trapz = np.trapezoid

HERE = pathlib.Path(__file__).resolve().parent / "quantus"
STEPS = 16  # features_in_step of the step-wise metrics: 768 / 16 = 48 steps


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()


def run(metric, x, y, a, net, batch_size=1, **options):
    instance = metric(disable_warnings=True, return_aggregate=False, **options)
    scores = instance(model=net, x_batch=x, y_batch=y, a_batch=a.copy(), s_batch=None, batch_size=batch_size,
                      channel_first=True, explain_func=None, explain_func_kwargs=None, model_predict_kwargs=None,
                      softmax=False)
    return scores


def as_tensor(scores) -> torch.Tensor:
    return torch.tensor(np.asarray(scores, dtype=np.float64))


def error_of(call) -> str:
    try:
        call()
    except Exception as err:  # what Quantus raises is the record
        return f"{type(err).__name__}: {err}"
    return ""


def main() -> None:
    saved = torch.load(HERE / "reference.pt", weights_only=True)
    net = model()
    net.load_state_dict(saved["state_dict"])
    fn, params = tx.functionalize(net)
    x, y = saved["x"], saved["y"]
    maps = {"saliency": tx.saliency(fn, params, x, y).detach(),
            "integrated_gradients": tx.integrated_gradients(fn, params, x, y).detach()}
    xn, yn = x.numpy(), y.numpy()
    values, extra = {}, {}
    update = "--update" in sys.argv  # redo only the random and batch-wide parts, keep the rest of the file
    if update:
        old = torch.load(HERE / "faithfulness.pt", weights_only=True)
        values, extra = old["values"], old["extra"]
    for method, a in maps.items():
        an = a.numpy().astype(np.float64)
        cases = {} if update else {
            "pixel_flipping": (quantus.PixelFlipping, {"features_in_step": 64}),
            "pixel_flipping_step": (quantus.PixelFlipping, {"features_in_step": STEPS}),
            "pixel_flipping_white": (quantus.PixelFlipping, {"features_in_step": STEPS, "perturb_baseline": "white"}),
            "region_perturbation": (quantus.RegionPerturbation, {"patch_size": 4}),
            "region_perturbation_lerf": (quantus.RegionPerturbation, {"patch_size": 4, "order": "lerf"}),
            "region_perturbation_pad": (quantus.RegionPerturbation, {"patch_size": 6, "regions_evaluation": 5}),
            "selectivity": (quantus.Selectivity, {"patch_size": 4}),
            "selectivity_pad": (quantus.Selectivity, {"patch_size": 6}),
            "faithfulness_estimate": (quantus.FaithfulnessEstimate, {"features_in_step": 64}),
            "faithfulness_estimate_step": (quantus.FaithfulnessEstimate, {"features_in_step": STEPS, "abs": True}),
            "monotonicity_correlation": (quantus.MonotonicityCorrelation,
                                         {"features_in_step": STEPS, "nr_samples": 2, "perturb_baseline": "black"}),
            "monotonicity_quantus": (quantus.Monotonicity, {"features_in_step": STEPS}),
            "infidelity": (quantus.Infidelity, {"n_perturb_samples": 2}),
            "infidelity_patch8": (quantus.Infidelity, {"n_perturb_samples": 1, "perturb_patch_sizes": [8]}),
        }
        for name, (metric, options) in cases.items():
            values[(method, name)] = as_tensor(run(metric, xn, yn, an, net, **options))
            print(method, name, values[(method, name)])  # noqa: T201

        # Monotonicity as the paper says: the features are put back (x's values), least relevant first.
        calls = [0]
        steps = an[0].size // STEPS

        def restore(arr, indices, perturb_baseline=None, calls=calls, steps=steps, **kwargs):
            example = calls[0] // steps
            calls[0] += 1
            out = arr.copy()
            source = xn[example].reshape(1, -1)
            np.put_along_axis(out, indices, np.take_along_axis(source, indices, axis=1), axis=1)
            return out
        if not update:
            values[(method, "monotonicity_restored")] = as_tensor(
                run(quantus.Monotonicity, xn, yn, an, net, features_in_step=STEPS, perturb_func=restore))

        # Faithfulness correlation: note the subsets Quantus draws (example by example, run by run).
        drawn = []

        def noting(arr, indices, perturb_baseline="black", drawn=drawn, **kwargs):
            drawn.append(np.array(indices))
            return batch_baseline_replacement_by_indices(arr=arr, indices=indices, perturb_baseline=perturb_baseline)
        np.random.seed(7)
        values[(method, "faithfulness_correlation")] = as_tensor(
            run(quantus.FaithfulnessCorrelation, xn, yn, an, net, nr_runs=30, subset_size=64, perturb_func=noting))
        extra[(method, "faithfulness_correlation_subsets")] = torch.tensor(
            np.concatenate(drawn).reshape(8, 30, 64))

        # Sensitivity-n, as Quantus computes it: across the 8 examples of the batch, one value per n.
        values[(method, "sensitivity_n_quantus")] = as_tensor(
            run(quantus.SensitivityN, xn, yn, an, net, batch_size=8, features_in_step=STEPS))
        values[(method, "sufficiency")] = as_tensor(run(quantus.Sufficiency, xn, yn, an, net, batch_size=8))
        values[(method, "sufficiency_095")] = as_tensor(run(quantus.Sufficiency, xn, yn, an, net, batch_size=8,
                                                            threshold=0.95))
        print(method, "rest", values[(method, "sufficiency")], values[(method, "sensitivity_n_quantus")])  # noqa: T201

    a = maps["saliency"].numpy().astype(np.float64)
    bugs = {
        "irof_3_channels": error_of(lambda: run(quantus.IROF, xn, yn, a, net)),
        "road_3_channels": error_of(lambda: run(quantus.ROAD, xn, yn, a, net, percentages=[10, 50])),
    }
    for key, value in bugs.items():
        print(key, value)  # noqa: T201
    torch.save({"maps": maps, "values": values, "extra": extra, "bugs": bugs, "steps": STEPS,
                "versions": {"quantus": quantus.__version__, "torch": str(torch.__version__),
                             "numpy": str(np.__version__)}}, HERE / "faithfulness.pt")
    print("wrote", HERE / "faithfulness.pt")  # noqa: T201


if __name__ == "__main__":
    main()
