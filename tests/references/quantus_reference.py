"""Reference values of Quantus 0.6.0 for the complexity and localisation metrics of ``tx.metrics``.

Run once, in a separate environment that has Quantus (it is not a dependency of torchex_fn)::

    python3.11 -m venv /tmp/quantusenv
    /tmp/quantusenv/bin/pip install torch==2.14.1 quantus==0.6.0
    /tmp/quantusenv/bin/python tests/references/quantus_reference.py

It writes ``tests/references/quantus/reference.pt``: a small CNN's inputs (8 images 3 x 16 x 16, random
weights), the maps of ``tx.saliency`` and ``tx.integrated_gradients`` on it (channels summed), object
masks, mosaic quadrant flags, and what Quantus computes on them. ``tests/evaluation/test_quantus_parity.py``
reads the file; it never imports Quantus.

Quantus divides every map by the largest magnitude of its whole batch; ``tx.metrics`` divides each example
by its own. Quantus called on one example at a time normalises per example (its ``batch_size`` does not change the
normalisation: it divides the whole ``a_batch`` given before it splits it), so the values of those calls
(``per_example``) are what ``tx.metrics`` must give; ``per_batch`` keeps Quantus's default for the
tests that show the difference. The bugs the tests show are recorded as Quantus produces them (``bugs``).
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

import torchex_fn as tx  # noqa: E402

if not hasattr(np, "trapz"):  # numpy 2.4 removed it; Quantus 0.6.0 still calls it
    np.trapz = np.trapezoid

OUT = pathlib.Path(__file__).resolve().parent / "quantus" / "reference.pt"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)).eval()


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=gen)
    masks = torch.zeros(8, 1, 16, 16, dtype=torch.bool)
    for i in range(8):  # rectangles of different sizes and places
        top, left = int(torch.randint(0, 8, (), generator=gen)), int(torch.randint(0, 8, (), generator=gen))
        h, w = int(torch.randint(3, 9, (), generator=gen)), int(torch.randint(3, 9, (), generator=gen))
        masks[i, 0, top:top + h, left:left + w] = True
    quadrants = torch.randint(0, 2, (8, 4), generator=gen).bool()
    quadrants[:, 0] = True  # at least one target quadrant each
    return x, masks, quadrants


LOCALISATION = {
    "attribution_localisation": (quantus.AttributionLocalisation, {}),
    "attribution_localisation_positive": (quantus.AttributionLocalisation,
                                          {"abs": False, "positive_attributions": True}),
    "relevance_mass_accuracy": (quantus.RelevanceMassAccuracy, {"abs": True}),
    "relevance_rank_accuracy": (quantus.RelevanceRankAccuracy, {}),
    "top_k_intersection": (quantus.TopKIntersection, {"k": 50}),
    "top_k_intersection_influence": (quantus.TopKIntersection, {"k": 50, "concept_influence": True}),
    "auc": (quantus.AUC, {}),
    "pointing_game": (quantus.PointingGame, {}),
}
COMPLEXITY = {
    "complexity": (quantus.Complexity, {}),
    "effective_complexity": (quantus.EffectiveComplexity, {}),
    "effective_complexity_eps": (quantus.EffectiveComplexity, {"eps": 1e-2}),
    "sparseness": (quantus.Sparseness, {}),
}


def run(metric, options, x, y, a, s, batch_size, **call):
    instance = metric(disable_warnings=True, **options)
    scores = instance(model=call.pop("model", None), x_batch=x, y_batch=y, a_batch=a.copy(), s_batch=s,
                      batch_size=batch_size, channel_first=True, explain_func=call.pop("explain_func", None),
                      explain_func_kwargs=None, model_predict_kwargs=None, softmax=False, **call)
    return torch.tensor(np.asarray(scores, dtype=np.float64))


def saliency_of(net):
    fn, params = tx.functionalize(net)

    def explain(model, inputs, targets, **kwargs):
        x, y = torch.as_tensor(inputs), torch.as_tensor(targets).long()
        return tx.saliency(fn, params, x, y).sum(1, keepdim=True).detach().numpy()
    return explain


def random_logit() -> None:
    """Adds Quantus's random logit (saliency, SSIM) to the file, one example at a time, and the class each
    example's draw gave (Quantus seeds numpy with 42 and draws among the classes other than the target)."""
    saved = torch.load(OUT, weights_only=True)
    net = model()
    net.load_state_dict(saved["state_dict"])
    x, y, a = saved["x"].numpy(), saved["y"].numpy(), saved["maps"]["saliency"].numpy().astype(np.float64)
    scores, off = [], []
    for i in range(8):
        scores.append(run(quantus.RandomLogit, {"num_classes": 10}, x[i:i + 1], y[i:i + 1], a[i:i + 1], None,
                          batch_size=1, model=net, explain_func=saliency_of(net)))
        np.random.seed(42)
        others = [c for c in range(10) if c != y[i]]
        off.append(others[int(np.random.randint(0, 9, 1)[0])])
    saved["per_example"][("saliency", "random_logit")] = torch.cat(scores)
    saved["random_logit_off_target"] = torch.tensor(off)
    torch.save(saved, OUT)
    print("random logit", torch.cat(scores), off)


def main() -> None:
    net = model()
    fn, params = tx.functionalize(net)
    x, masks, quadrants = data()
    with torch.no_grad():
        y = net(x).argmax(1)
    maps = {"saliency": tx.saliency(fn, params, x, y).sum(1, keepdim=True).detach(),
            "integrated_gradients": tx.integrated_gradients(fn, params, x, y).sum(1, keepdim=True).detach()}
    xn, yn, sn = x.numpy(), y.numpy(), masks.numpy().astype(np.float32)
    per_example, per_batch = {}, {}
    for method, a in maps.items():
        an = a.numpy().astype(np.float64)
        for name, (metric, options) in {**LOCALISATION, **COMPLEXITY}.items():
            per_example[(method, name)] = torch.cat([run(metric, options, xn[i:i + 1], yn[i:i + 1], an[i:i + 1],
                                                         sn[i:i + 1], batch_size=1) for i in range(8)])
            per_batch[(method, name)] = run(metric, options, xn, yn, an, sn, batch_size=8)
        per_example[(method, "focus")] = torch.cat([
            run(quantus.Focus, {}, xn[i:i + 1], yn[i:i + 1], an[i:i + 1], sn[i:i + 1], batch_size=1, model=net,
                custom_batch=[tuple(int(v) for v in quadrants[i])]) for i in range(8)])

    for method, a in maps.items():  # model-based: non-sensitivity, one element at a time
        an = a.numpy().astype(np.float64)
        for name, options in {"non_sensitivity": {}, "non_sensitivity_white": {"perturb_baseline": "white",
                                                                                "eps": 1e-3}}.items():
            per_example[(method, name)] = torch.cat([
                run(quantus.NonSensitivity, options, xn[i:i + 1], yn[i:i + 1], an[i:i + 1], sn[i:i + 1],
                    batch_size=1, model=net) for i in range(8)])
            per_batch[(method, name)] = run(quantus.NonSensitivity, options, xn, yn, an, sn, batch_size=8, model=net)

    a = maps["saliency"].numpy().astype(np.float64)
    bugs = {}
    try:
        run(quantus.NonSensitivity, {"features_in_step": 4}, xn, yn, a, sn, batch_size=8, model=net)
        bugs["non_sensitivity_features_in_step_raises"] = ""
    except Exception as err:  # noqa: BLE001 - what Quantus raises is the record
        bugs["non_sensitivity_features_in_step_raises"] = f"{type(err).__name__}: {err}"
    empty = sn.copy()
    empty[0] = 0
    bugs["pointing_game_empty_mask"] = run(quantus.PointingGame, {}, xn, yn, a, empty, batch_size=8)
    try:
        run(quantus.PointingGame, {"weighted": True}, xn, yn, a, sn, batch_size=8)
        bugs["pointing_game_weighted_raises"] = ""
    except Exception as err:  # noqa: BLE001 - what Quantus raises is the record
        bugs["pointing_game_weighted_raises"] = f"{type(err).__name__}: {err}"
    bugs["attribution_localisation_weighted_batch8"] = run(quantus.AttributionLocalisation, {"weighted": True},
                                                           xn, yn, a, sn, batch_size=8)
    bugs["attribution_localisation_weighted_batch4"] = run(quantus.AttributionLocalisation, {"weighted": True},
                                                           xn, yn, a, sn, batch_size=4)
    before = a.copy()
    quantus.Sparseness(disable_warnings=True, normalise=False, abs=False)(
        model=None, x_batch=xn, y_batch=yn, a_batch=a, s_batch=None, channel_first=True, explain_func=None,
        explain_func_kwargs=None, model_predict_kwargs=None, softmax=False)
    bugs["sparseness_writes_into_the_callers_array"] = float(np.abs(a - before).max())

    OUT.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "x": x, "y": y, "masks": masks, "quadrants": quadrants,
                "maps": maps, "per_example": per_example, "per_batch": per_batch, "bugs": bugs,
                "versions": {"quantus": quantus.__version__, "torch": str(torch.__version__),
                             "numpy": str(np.__version__)}}, OUT)
    print(f"wrote {OUT}")
    for key, value in bugs.items():
        print(key, value)


if __name__ == "__main__":
    if "--random-logit-only" not in sys.argv:  # the full run takes minutes: the last part can be redone alone
        main()
    random_logit()
