"""MAML with an explanation term: ``torch.func.grad`` through Grad-CAM and an inner SGD step.

One MAML outer step (Finn et al., ICML 2017) adapts the parameters on a support batch with one
SGD step and scores the adapted parameters on a query batch:

    adapted = params - alpha * grad_params inner(params; support)
    outer(params) = cross_entropy(adapted; query) + lam * || grad_cam(adapted; query) * not allowed ||^2

Here the inner loss is penalised too (``inner = cross_entropy + lam * grad_cam penalty``, an
explanation-constrained adaptation). Grad-CAM is itself a gradient (of the score w.r.t. a layer),
so ``grad_params inner`` holds second derivatives of the model and ``grad_params outer``
differentiates through it: the outer gradient contains *third* derivatives of the model. All of it
is ``torch.func.grad`` of a pure function of the parameter dict.

The script checks one coordinate of the outer gradient against a central finite difference in
float64 on a tiny Softplus model (smooth, so finite differences are meaningful), and times an outer
step against a plain MAML outer step (no explanation term in either loss).

Usage:
  python examples/maml_explanation.py            # check + timing on 32 x 32 images, batch 32
  python examples/maml_explanation.py --quick    # smaller timing batch
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from right_for_right_reasons import SmallNet  # noqa: E402  (the example next to this one)

import torchex_fn as tx  # noqa: E402
from torchex_fn.data import decoy_shapes  # noqa: E402

Params = Dict[str, Tensor]


def task_loss(params: Params, model_fn, x: Tensor, y: Tensor, allowed: Tensor, lam: float) -> Tensor:
    """Cross-entropy plus ``lam`` times the Grad-CAM mass (true class, signed) outside ``allowed``."""
    ce = F.cross_entropy(model_fn(params, x), y)
    if lam == 0:
        return ce
    cam = tx.grad_cam(model_fn, params, x, y, layer="features", relu=False)   # [B, 1, H, W]
    return ce + lam * (cam * ~allowed).square().sum() / x.shape[0]


def outer_loss(params: Params, model_fn, support: tuple, query: tuple, *, alpha: float, lam: float) -> Tensor:
    """The MAML objective after one inner SGD step on ``support`` (both losses use ``lam``)."""
    inner_grads = torch.func.grad(task_loss)(params, model_fn, *support, lam)
    adapted = {k: p - alpha * inner_grads[k] for k, p in params.items()}
    return task_loss(adapted, model_fn, *query, lam)


def tiny_problem(dtype=torch.float64, seed: int = 0):
    """A width-4 Softplus :class:`SmallNet`, and 2 + 2 decoy images of 8 x 8 (patch 2 x 2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallNet(4, width=4, act=nn.Softplus).to(dtype)
    model_fn, params = tx.functionalize(model)
    data = decoy_shapes(4, split="train", seed=seed, size=8)
    x = data.images.to(dtype)
    support = (x[:2], data.labels[:2], data.allowed[:2])
    query = (x[2:], data.labels[2:], data.allowed[2:])
    return model_fn, {k: p.clone() for k, p in params.items()}, support, query


def finite_difference_check(*, name: str = "features.0.weight", index=(0, 0, 1, 1), eps: float = 1e-5,
                            alpha: float = 0.5, lam: float = 1.0, dtype=torch.float64) -> tuple:
    """``(autograd, finite difference)`` of ``d outer / d params[name][index]`` on :func:`tiny_problem`."""
    model_fn, params, support, query = tiny_problem(dtype)
    grads = torch.func.grad(outer_loss)(params, model_fn, support, query, alpha=alpha, lam=lam)

    def at(shift: float) -> Tensor:
        p = dict(params)
        p[name] = params[name].clone()
        p[name][index] += shift
        return outer_loss(p, model_fn, support, query, alpha=alpha, lam=lam)

    fd = (at(eps) - at(-eps)) / (2 * eps)
    return grads[name][index], fd


def step_times(*, batch: int = 32, size: int = 32, width: int = 16, alpha: float = 0.1, lam: float = 10.0,
               repeats: int = 5, seed: int = 0) -> Dict[str, float]:
    """Median seconds of one outer gradient: plain MAML and MAML with the Grad-CAM term."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_fn, params = tx.functionalize(SmallNet(4, width))
    data = decoy_shapes(2 * batch, split="train", seed=seed, size=size)
    support = (data.images[:batch], data.labels[:batch], data.allowed[:batch])
    query = (data.images[batch:], data.labels[batch:], data.allowed[batch:])
    step = torch.func.grad(outer_loss)
    plain_step = torch.func.grad(lambda p: F.cross_entropy(model_fn(p, query[0]), query[1]))

    def timed(f):
        f()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    result = {"sgd": [], "maml": [], "maml_gradcam": []}
    for _ in range(3):  # interleaved, so that load from other processes hits all three alike
        result["sgd"].append(timed(lambda: plain_step(params)))
        result["maml"].append(timed(lambda: step(params, model_fn, support, query, alpha=alpha, lam=0.0)))
        result["maml_gradcam"].append(timed(lambda: step(params, model_fn, support, query, alpha=alpha, lam=lam)))
    return {k: sorted(v)[1] for k, v in result.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 8 for the timing")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch = 8
    auto, fd = finite_difference_check()
    print(f"d outer / d features.0.weight[0,0,1,1] (float64, tiny Softplus model): "
          f"torch.func.grad {auto.item():.10e}, central difference {fd.item():.10e}, "
          f"relative error {abs(auto - fd).item() / abs(fd).item():.1e}")
    t = step_times(batch=args.batch, size=args.size)
    print(f"\none outer gradient, batch {args.batch} support + {args.batch} query, {args.size}x{args.size} px, "
          f"{torch.get_num_threads()} threads (median of 3 x 5):")
    print("| step | time | vs plain MAML |")
    print("| --- | ---: | ---: |")
    for key, label in (("sgd", "plain SGD step (query loss only)"), ("maml", "plain MAML outer step"),
                       ("maml_gradcam", "MAML, Grad-CAM term in inner and outer loss")):
        print(f"| {label} | {1e3 * t[key]:.0f} ms | {t[key] / t['maml']:.2f}× |")


if __name__ == "__main__":
    main()
