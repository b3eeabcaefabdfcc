"""What the ``params`` key check (issue 22, item 1) costs a call of ``model_fn``.

Every call of a ``model_fn`` from ``functionalize`` compares ``params``'s keys with the module's (a set
comparison; a partial dict under ``strict=False`` also looks for unknown keys). Contenders, one process,
interleaved: ``torch.func.functional_call`` of the module (the floor), ``model_fn(params, x)`` (the check, the
lock and the hooks' bookkeeping), and the check alone. Worst cases first: a tiny MLP on one example, then
resnet18 at batch 1 (64 px) and a
12-block torchvision ViT of width 64 (many keys, a short forward).

    .venv/bin/python benchmarks/bench_params_check.py [--rounds 30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common

import torchex_fn as tx


def _cases():
    import torchvision
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    yield "MLP 16-32-4, batch 1", mlp, torch.randn(1, 16)
    yield "resnet18, batch 1, 64 px", _common.resnet18(), torch.randn(1, 3, 64, 64)
    vit = torchvision.models.VisionTransformer(32, 8, num_layers=12, num_heads=4, hidden_dim=64, mlp_dim=128).eval()
    yield "ViT 12 blocks (d 64), batch 1, 32 px", vit, torch.randn(1, 3, 32, 32)


def _contenders(model: nn.Module, x: torch.Tensor):
    fn, params = tx.functionalize(model)
    loose, _ = tx.functionalize(model, strict=False)
    partial = dict(list(params.items())[1:])
    return len(params), {
        "functional_call": lambda: torch.func.functional_call(model, params, (x,)),
        "model_fn": lambda: fn(params, x),
        "check": lambda: fn.check_params("bench", params),
        "check, partial": lambda: loose.check_params("bench", partial),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _common.setup(args.threads)
    rows = []
    for name, model, x in _cases():
        keys, contenders = _contenders(model, x)
        with torch.no_grad():
            t = _common.medians(_common.race(contenders, args.rounds, 200 if x.ndim == 2 else 5))
        rows.append((name, keys, f"{t['functional_call'] * 1e6:.1f}", f"{t['model_fn'] * 1e6:.1f}",
                     _common.ratio(t["model_fn"], t["functional_call"]), f"{t['check'] * 1e6:.2f}",
                     f"{t['check, partial'] * 1e6:.2f}"))
    print(_common.machine(args.threads))
    print(_common.table(["model", "keys", "functional_call µs", "model_fn µs", "model_fn / functional_call",
                         "check µs", "check, partial dict (strict=False) µs"], rows, right=range(1, 7)))


if __name__ == "__main__":
    main()
