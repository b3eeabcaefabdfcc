"""Which methods compile without a graph break, and do the compiled maps agree (all of METHODS).

For every entry of ``tests/support/contracts.py``'s METHODS table (its tiny CNN, batch 3 at 8 x 8):
``torch.compile(..., backend="eager", fullgraph=True)`` (does dynamo capture the whole call?); if not,
``torch._dynamo.explain`` (graphs, breaks, first reasons) and ``torch.compile(..., backend="aot_eager")``
with graph breaks allowed, checked against the eager map. Prints a markdown table. Not a test.

Usage::

    python benchmarks/compile_methods.py [names ...]
"""
from __future__ import annotations

import collections
import os
import sys
import time
import warnings

import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import support.contracts as tc  # noqa: E402

import torchex_fn as tx  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    fn, params = tx.functionalize(tc.contract_model())
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    names = sys.argv[1:] or list(tc.METHODS)
    print("| method | fullgraph | graphs / breaks | break reasons (dynamo's first line) | max abs diff | s |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for name in names:
        method, options, _ = tc.METHODS[name]
        f = lambda x: method(fn, params, x, target, **options)  # noqa: E731
        ref = f(x)
        start = time.perf_counter()
        torch._dynamo.reset()
        try:
            out = torch.compile(f, backend="eager", fullgraph=True)(x)
            print(f"| {name} | yes | 1 / 0 | | {float((out - ref).abs().max()):.1e} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)
            continue
        except Exception:  # noqa: BLE001 - the graph break is what we report
            pass
        torch._dynamo.reset()
        explained = torch._dynamo.explain(f)(x)
        reasons = collections.Counter(b.reason.split("\n")[0][:90] for b in explained.break_reasons)
        torch._dynamo.reset()
        try:
            out = torch.compile(f, backend="aot_eager")(x)
            diff = f"{float((out - ref).abs().max()):.1e}"
        except Exception as err:  # noqa: BLE001
            diff = f"failed: {type(err).__name__}"
        print(f"| {name} | no | {explained.graph_count} / {explained.graph_break_count} | "
              f"{'; '.join(reasons) or '(not reported)'} | {diff} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
