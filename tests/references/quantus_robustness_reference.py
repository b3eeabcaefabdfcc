"""Reference values of Quantus 0.6.0 for the robustness metrics of ``tx.metrics``.

Run once, in the environment that made ``quantus/reference.pt`` (see ``quantus_reference.py``)::

    /work/quantusenv/bin/python tests/references/quantus_robustness_reference.py

It reads the CNN, the 8 images and their classes from ``quantus/reference.pt`` and writes
``quantus/robustness_<method>.pt`` (one file per method; the methods are named on the command line,
both by default): the noise both libraries are fed (drawn here once with torch, handed to Quantus
through its ``perturb_func``, one draw per call, and to ``tx.metrics`` the same way), and Quantus's scores
for the maps of ``tx.saliency`` and ``tx.integrated_gradients`` (channels summed). Quantus is called one
example at a time (its normalisation is then per example, as ours), except for consistency, which compares
the examples of a batch by definition, and the ``per_batch`` records that show Quantus's batch-wide
normalisation. ``tests/evaluation/test_robustness_parity.py`` reads the file; it never imports Quantus.
"""
from __future__ import annotations

import pathlib
import sys
from functools import partial

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import quantus  # noqa: E402
from quantus_reference import model  # noqa: E402

import torchex_fn as tx  # noqa: E402

if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
    np.trapz = np.trapezoid

HERE = pathlib.Path(__file__).resolve().parent / "quantus"
SAMPLES = 10
STEPS = 8  # integration steps of integrated gradients (Quantus calls the method once per draw)


def explainer(fn, params, method):
    def explain(model, inputs, targets, **kwargs):
        x, y = torch.as_tensor(inputs), torch.as_tensor(targets).long()
        return method(fn, params, x, y).sum(1, keepdim=True).detach().numpy()
    return explain


class Feed:
    """A Quantus ``perturb_func`` that hands out the prepared draws of one example, in order."""

    def __init__(self, perturbed):                 # [SAMPLES, 1, C, H, W]
        self.perturbed, self.calls = perturbed, 0

    def __call__(self, arr, indices=None, **kwargs):
        out = self.perturbed[self.calls].reshape(arr.shape).numpy()
        self.calls += 1
        return out


def save(methods, noise, per_example, per_batch) -> None:
    """Written after every metric, so that a long run that stops keeps what it has."""
    path = HERE / f"robustness_{'_'.join(methods)}.pt"
    torch.save({"noise": noise, "samples": SAMPLES, "per_example": per_example, "per_batch": per_batch,
                "versions": {"quantus": quantus.__version__, "torch": str(torch.__version__),
                             "numpy": str(np.__version__)}}, path)
    print("wrote", path)


def main() -> None:
    saved = torch.load(HERE / "reference.pt", weights_only=True)
    net = model()
    net.load_state_dict(saved["state_dict"])
    fn, params = tx.functionalize(net)
    x, y = saved["x"], saved["y"]
    gen = torch.Generator().manual_seed(7)
    noise = {"uniform": (torch.rand((SAMPLES,) + tuple(x.shape), generator=gen) * 2 - 1) * 0.2,
             "gaussian": torch.randn((SAMPLES,) + tuple(x.shape), generator=gen) * 0.1,
             "positive": 0.02 + 0.18 * torch.rand((SAMPLES,) + tuple(x.shape), generator=gen)}
    metrics = {
        "avg_sensitivity": (quantus.AvgSensitivity, {}, "uniform"),
        "max_sensitivity": (quantus.MaxSensitivity, {}, "uniform"),
        "local_lipschitz_estimate": (quantus.LocalLipschitzEstimate, {}, "gaussian"),
        "relative_input_stability": (quantus.RelativeInputStability, {}, "positive"),
        "relative_output_stability": (quantus.RelativeOutputStability, {}, "positive"),
        "relative_representation_stability": (quantus.RelativeRepresentationStability, {}, "positive"),
    }
    methods = {"saliency": tx.saliency, "integrated_gradients": partial(tx.integrated_gradients, steps=STEPS)}
    methods = {name: methods[name] for name in sys.argv[1:]} or methods
    xn, yn = x.numpy(), y.numpy()
    per_example, per_batch = {}, {}
    for name, method in methods.items():
        explain = explainer(fn, params, method)
        a = method(fn, params, x, y).sum(1, keepdim=True).detach().numpy().astype(np.float64)

        def run(metric, options, i, a=a, explain=explain, **extra):
            instance = metric(disable_warnings=True, nr_samples=SAMPLES, **options, **extra) if "nr_samples" in \
                metric.__init__.__code__.co_varnames else metric(disable_warnings=True, **options, **extra)
            scores = instance(model=net, x_batch=xn[i], y_batch=yn[i], a_batch=a[i].copy(), s_batch=None,
                              channel_first=True, explain_func=explain, explain_func_kwargs=None,
                              model_predict_kwargs=None, softmax=False, batch_size=len(yn[i]))
            return torch.tensor(np.asarray(scores, dtype=np.float64))

        for key, (metric, options, kind) in metrics.items():
            per_example[(name, key)] = torch.cat([
                run(metric, options, slice(i, i + 1), perturb_func=Feed(x[i:i + 1] + noise[kind][:, i:i + 1]))
                for i in range(8)])
            print(name, key, per_example[(name, key)])
            save(methods, noise, per_example, per_batch)
        for key, options in {"continuity": {}, "continuity_white": {"perturb_baseline": "white"}}.items():
            per_example[(name, key)] = torch.cat([run(quantus.Continuity, options, slice(i, i + 1))
                                                  for i in range(8)])
            if key == "continuity":
                per_batch[(name, key)] = run(quantus.Continuity, options, slice(0, 8))
            print(name, key, per_example[(name, key)], per_batch.get((name, key)))
            save(methods, noise, per_example, per_batch)
        per_batch[(name, "consistency")] = run(quantus.Consistency, {}, slice(0, 8))
        print(name, "consistency", per_batch[(name, "consistency")])
    save(methods, noise, per_example, per_batch)

if __name__ == "__main__":
    main()
