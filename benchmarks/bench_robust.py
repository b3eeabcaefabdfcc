"""Attacks and TCAV: torchex_fn vs captum 0.9 on resnet18 (random init, eval), one process, round-robin.

Contenders (a batch of 8 images 3x64x64 by default; layer ``layer3`` for TCAV):

* FGSM: ``tx.robust.fgsm`` vs captum's ``FGSM.perturb`` (cross-entropy, per example); floor: one forward and
  one ``autograd.grad`` of the summed loss to the input (what one step cannot avoid);
* PGD, 10 L-infinity steps: ``tx.robust.pgd`` vs captum's ``PGD.perturb``; floor: 10 of the above;
* TCAV of 10 given CAVs: ``tx.concepts.tcav`` vs captum's ``TCAV.interpret`` (its CAVs given by a classifier
  that trains nothing, already computed and cached on disk after the warm-up); floor: one forward and one
  backward to the layer's output.

Medians over rounds, and the median of the per-round ratios to the floor and to captum.

    python benchmarks/bench_robust.py [--threads 2] [--rounds 5] [--batch 8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


def _given_classifier(vectors):
    from captum.concept._utils.classifier import Classifier

    class Given(Classifier):
        def __init__(self):
            self.vectors, self.current, self.ids = list(vectors), None, None

        def train_and_eval(self, dataloader, **kwargs):
            self.current = self.vectors.pop(0).reshape(-1)
            self.ids = torch.cat([labels for _, labels in dataloader]).unique().tolist()
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            return torch.stack([self.current, -self.current])

        def classes(self):
            return self.ids

    return Given()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    C.setup(args.threads)
    from captum.concept import TCAV, Concept
    from captum.robust import FGSM, PGD

    model = C.resnet18()
    fn, params = tx.functionalize(model)
    x = torch.randn(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(args.batch)
    ce = torch.nn.CrossEntropyLoss(reduction="none")

    def loss_grad(z):
        z = z.detach().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)[0]

    layer = model.layer3
    cavs = F.normalize(torch.randn(10, 256 * 4 * 4, generator=torch.Generator().manual_seed(2)), dim=1)
    concept = Concept(0, "concept", [x[:2]])
    sets = [[concept, Concept(1 + k, f"random{k}", [x[2:4] + k])] for k in range(10)]
    save = tempfile.mkdtemp()
    captum_tcav = TCAV(model, ["layer3"], classifier=_given_classifier(cavs), save_path=save)

    groups = {
        "FGSM": {
            "floor: forward + grad to x": lambda: loss_grad(x),
            "tx.robust.fgsm": lambda: tx.robust.fgsm(fn, params, x, y, epsilon=0.01),
            "captum FGSM": lambda: FGSM(model, ce).perturb(x, 0.01, y),
        },
        "PGD, 10 steps": {
            "floor: 10 x (forward + grad to x)": lambda: [loss_grad(x) for _ in range(10)],
            "tx.robust.pgd": lambda: tx.robust.pgd(fn, params, x, y, radius=0.03, step_size=0.01, step_num=10),
            "captum PGD": lambda: PGD(model, ce).perturb(x, 0.03, 0.01, 10, y),
        },
        "TCAV, 10 CAVs": {
            "floor: forward + grad to layer3": lambda: C.grad_layers(model, [layer], x, y),
            "tx.concepts.tcav": lambda: tx.concepts.tcav(fn, params, x, y, layer="layer3",
                                                         cavs=cavs.reshape(10, 256, 4, 4)).score,
            "captum TCAV.interpret": lambda: captum_tcav.interpret(x, sets, target=y),
        },
    }
    ours = tx.robust.pgd(fn, params, x, y, radius=0.03, step_size=0.01, step_num=10)
    theirs = PGD(model, ce).perturb(x, 0.03, 0.01, 10, y)
    print(f"parity PGD: max |ours - captum| = {float((ours - theirs).abs().max()):.1e}")
    print(f"\n{C.machine(args.threads)}; resnet18 random init, batch {args.batch} x 3 x 64 x 64, "
          f"{args.rounds} rounds\n")
    rows = []
    for group, contenders in groups.items():
        times = C.race(contenders, args.rounds)
        names = list(contenders)
        floor, peer = times[names[0]], times[names[2]]
        for name, t in times.items():
            rows.append((group, name, f"{statistics.median(t) * 1e3:.1f}",
                         f"{statistics.median(a / b for a, b in zip(t, floor)):.2f}",
                         f"{statistics.median(a / b for a, b in zip(t, peer)):.2f}"))
    print(C.table(["attack", "contender", "median ms", "x floor", "x captum"], rows, right=(2, 3, 4)))


if __name__ == "__main__":
    main()
