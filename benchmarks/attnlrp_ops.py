"""Count the aten calls of AttnLRP (ours), LXT 2.1's patched model and the forward + backward floor.

Runs in the LXT venv, like ``bench_attnlrp.py`` (whose model, floor and LXT patch it reuses): every aten call
of one call of each row is logged by a ``TorchDispatchMode``; outputs above 1e5 elements are counted per
operation and shape, and the rows' counts printed where they differ. A load-independent view of what ours
computes on top of LXT (``benchmarks/README.md``, AttnLRP section).

    PYTHONPATH=. /work/lxtenv/bin/python benchmarks/attnlrp_ops.py [eager|sdpa]
"""
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import bench_attnlrp as B


class Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes, self.elements = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.elements["all calls"] += 1
        if isinstance(first, torch.Tensor) and first.numel() > 100000:
            name = func.overloadpacket.__name__
            self.shapes[f"{name}{tuple(first.shape)}"] += 1
            self.elements[name] += first.numel()
        return out


def main() -> None:
    torch.set_num_threads(1)
    attn = sys.argv[1] if len(sys.argv) > 1 else "eager"
    model = B.build(attn, 4, 256, 688, 4, 1024)
    ids = torch.randint(0, 1024, (4, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = model(ids).logits[:, -1].argmax(-1)
    logs = {}
    for name, f in (("floor", B.floor_fn(model, ids, target)), ("ours", B.ours_fn(model, ids, target))):
        with Log() as log:
            f()
        logs[name] = log
    restore = B.patch_lxt()
    try:
        with Log() as log:
            B.floor_fn(model, ids, target)()
        logs["LXT"] = log
    finally:
        restore()
    rows = ("floor", "ours", "LXT")
    print(f"{attn}: calls with outputs over 1e5 elements, where the rows differ ({', '.join(rows)})")
    for key in sorted(set().union(*(log.shapes for log in logs.values()))):
        counts = [logs[r].shapes[key] for r in rows]
        if len(set(counts)) > 1:
            print(f"  {key:45s} {counts}")
    print("elements (millions) per operation, and all calls:")
    for key in sorted(set().union(*(log.elements for log in logs.values()))):
        values = [logs[r].elements[key] / (1 if key == "all calls" else 1e6) for r in rows]
        if len(set(values)) > 1:
            print(f"  {key:25s} " + " ".join(f"{v:9.1f}" for v in values))


if __name__ == "__main__":
    main()
