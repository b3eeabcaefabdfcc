"""TracIn self-influence timings: ``tx.influence.tracin_cp`` vs captum's ``TracInCP`` (same process, same files).

Model: a small CNN (conv 3->16, conv 16->32, both 3x3 with ReLU and 2x2 max-pooling, linear 32*8*8 -> 10;
about 25k parameters) on 2,048 random 3x32x32 images with random labels (``--n``), CPU, 2 threads
(``--threads``). Three checkpoints (random weights from three seeds: the cost does not depend on them) are
saved to a temporary folder as ``{"params": state_dict, "lr": lr}``; both contenders read them there with a
load function (captum's writes into its module, ours returns the dict). The loss is the per-example
cross-entropy (captum: ``CrossEntropyLoss(reduction="sum")``, ours ``reduction="none"``), 128 examples per
chunk (``--batch``). Contenders:

* ``tracin_cp`` -- ours: ``vmap(grad(loss))`` over the params dict, one chunk at a time;
* ``captum TracInCP(sample_wise_grads_per_batch=True)`` -- its fastest setting (per-example gradients by
  module hooks);
* ``captum TracInCP`` with its default ``sample_wise_grads_per_batch=False`` (one backward per example)
  -- with ``--loop`` only (minutes).

The two results are compared (max relative difference) before timing. Rounds are interleaved and the median
is reported, as a ratio to ours.

Usage::

    PYTHONPATH=. python benchmarks/bench_influence.py            # 3 rounds, 2,048 examples
    PYTHONPATH=. python benchmarks/bench_influence.py --quick    # 1 round, 256 examples
    PYTHONPATH=. python benchmarks/bench_influence.py --threads 1 --clock cpu --loop   # on a loaded machine
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loop", action="store_true", help="also captum's default (a backward per example)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                        help="wall: perf_counter; cpu: process_time (steadier on a loaded machine, with --threads 1)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 256, 1
    C.setup(args.threads)
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x = torch.randn(args.n, 3, 32, 32)
    y = torch.randint(0, 10, (args.n,))
    folder = Path(tempfile.mkdtemp(prefix="bench_influence_"))
    paths = []
    for seed, lr in zip(range(3), (0.1, 0.05, 0.01)):
        torch.manual_seed(seed)
        paths.append(str(folder / f"ckpt{seed}.pt"))
        torch.save({"params": SmallCNN().state_dict(), "lr": lr}, paths[-1])

    def ours_load(path):
        state = torch.load(path, weights_only=True)
        return state["params"], state["lr"]

    def captum_load(model, path):
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["params"])
        return state["lr"]

    fn, _ = tx.functionalize(SmallCNN().eval())
    per_example = nn.CrossEntropyLoss(reduction="none")
    data = TensorDataset(x, y)
    theirs = TracInCP(SmallCNN().eval(), data, paths, captum_load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=args.batch, sample_wise_grads_per_batch=True)

    def ours() -> torch.Tensor:
        return tx.influence.tracin_cp(fn, paths, (x, y), loss_fn=per_example, load=ours_load,
                                      batch_size=args.batch)

    contenders = {"tracin_cp": ours, "captum TracInCP (sample-wise)": lambda: theirs.self_influence()}
    if args.loop:
        loop = TracInCP(SmallCNN().eval(), data, paths, captum_load,
                        loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=args.batch)
        contenders["captum TracInCP (default, loop)"] = lambda: loop.self_influence()
    a, b = ours(), theirs.self_influence()
    diff = ((a - b).abs().max() / b.abs().max()).item()
    print(C.machine(args.threads, f"small CNN, {args.n} examples, 3 checkpoints, chunks of {args.batch}, "
                                  f"{args.rounds} rounds, {args.clock} clock"))
    print(f"max relative difference ours vs captum: {diff:.2e}")
    times = C.medians(C.race(contenders, args.rounds, warmup=False, clock=C.clock_of(args.clock)))
    base = times["tracin_cp"]
    print(C.table(["contender", "s (median)", "/ ours"],
                  [(name, f"{t:.2f}", f"{t / base:.2f}") for name, t in times.items()], right=(1, 2)))


if __name__ == "__main__":
    main()
