"""Every public method of torchex_fn against its floor and its peer, one markdown table.

torchvision resnet18 (random init, eval), CPU, ``--threads`` torch threads (default 2), one process. For
each method its contenders (the floor, torchex_fn, the peers) run round-robin: one warm-up call each,
then ``--rounds`` rounds of one call each; the table gives medians and their ratios. Methods are measured
one after another (each with its own contenders interleaved), so a load that drifts between methods does
not bias a ratio, only a load that changes within a method's rounds does.

Floors (the work a method cannot avoid, with plain hooks and ``torch.autograd.grad``): see ``FLOORS``.
Inputs: ``x`` is a batch of ``--batch`` images (default 8) at ``--size`` (224); the methods that run one
forward per channel, window or mask (score_cam, ablation_cam, occlusion, rise) take its first image only.

    python benchmarks/bench_all.py                         # all methods, 3 rounds
    python benchmarks/bench_all.py --quick                 # batch 2 at 112 x 112, 2 rounds: a smoke run
    python benchmarks/bench_all.py --methods saliency guided_backprop --rounds 7
    python benchmarks/bench_all.py --list

Duration (2-core x86 CPU, 2 threads): the full run makes about 25 calls per round of the cheap methods
(0.3-0.6 s each on an idle machine) and about 10 of the path / sampling / ablation methods (5-15 s
each); 3 rounds plus warm-up take about 15 minutes idle, several times that on a loaded machine.
``--quick`` takes 1-2 minutes idle.

Adding a method is one entry in ``ENTRIES``: ``Entry(name, ours, floor, peers)``, where ``ours`` and each
peer are ``ctx -> (() -> result)`` builders and ``floor`` names a floor in ``FLOORS`` (or builds one);
``_ours(tx.method, **options)`` and ``_captum("ClassName", **options)`` build the usual ones, and an
option given as a ``lambda c: ...`` is evaluated on the context (sizes, baselines, a fresh generator), e.g.

    Entry("lrp", _ours(tx.lrp), "forward + backward to x", {"zennit epsilon_plus_flat": _zennit("epsilon_plus_flat")}),

The feature-mask methods (feature_ablation, shapley_value_sampling, kernel_shap, lime) are timed
against captum at equal numbers of model evaluations by ``benchmarks/bench_features.py``.
"""
from __future__ import annotations

import argparse
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402


class Ctx:
    """What the builders see: the model, its functional form, the inputs and the sizes."""

    def __init__(self, batch: int, size: int, steps: int, samples: int, masks: int):
        self.model = C.resnet18()
        self.fn, self.params = tx.functionalize(self.model)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen)
        self.t = torch.randint(0, 1000, (batch,), generator=gen)
        self.x1, self.t1 = self.x[:1], self.t[:1]
        self.baselines = torch.randn(4, 3, size, size, generator=gen) * 0.1      # gradient / deeplift SHAP
        self.steps, self.samples, self.masks = steps, samples, masks
        self.window = max(1, size // 14)                                          # occlusion: a 14 x 14 grid
        self.chunk = 32                                                           # ablation / score chunks
        self._twin: Optional[nn.Module] = None

    @property
    def twin(self) -> nn.Module:
        """A copy whose ReLUs are fresh modules called once (captum's DeepLift needs that on ResNet)."""
        if self._twin is None:
            self._twin = C.captum_ready_copy(self.model)
        return self._twin

    def gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------
# Floors.

def _times(n: int, floor: Callable[[], object]) -> Callable[[], None]:
    def run():
        for _ in range(n):
            floor()
    return run


def _ablation_tail(c: Ctx) -> Callable[[], None]:
    """One forward, then per chunk of channels one forward of the image whose layer4 output is replaced by
    the chunk's ablated activations (the tail, avgpool -> fc, runs on the chunk): what Ablation-CAM needs."""
    def run():
        with torch.no_grad():
            _, (act,) = C.hooked([c.model.layer4], lambda: c.model(c.x1))
            k = act.shape[1]
            for c0 in range(0, k, c.chunk):
                keep = 1 - torch.eye(k)[c0:c0 + c.chunk, :, None, None]
                C.hooked([c.model.layer4], lambda: c.model(c.x1), replace=lambda m, o, keep=keep: o * keep)
    return run


def _masked_forwards(c: Ctx, count: int, chunk: int) -> Callable[[], None]:
    """``count`` forwards of the first image without autograd, ``chunk`` at a time (score-CAM, occlusion, RISE)."""
    def run():
        with torch.no_grad():
            for start in range(0, count, chunk):
                c.model(c.x1.expand(min(chunk, count - start), -1, -1, -1).contiguous())
    return run


def _windows(c: Ctx) -> int:
    return math.ceil(c.x.shape[-1] / c.window) ** 2


FLOORS: Dict[str, Callable[[Ctx], Callable[[], object]]] = {
    "forward + backward to x": lambda c: lambda: C.grad_input(c.model, c.x, c.t),
    "forward + backward to layer4": lambda c: lambda: C.grad_layers(c.model, [c.model.layer4], c.x, c.t),
    "forward + hook on layer4": lambda c: lambda: C.hooked([c.model.layer4], lambda: C.forward(c.model, c.x)),
    "steps x (forward + backward to x)": lambda c: _times(c.steps, lambda: C.grad_input(c.model, c.x, c.t)),
    "samples x (forward + backward to x)": lambda c: _times(c.samples, lambda: C.grad_input(c.model, c.x, c.t)),
    "4 x (forward + backward to x)": lambda c: _times(4, lambda: C.grad_input(c.model, c.x, c.t)),
    "forward + backward to x and every batch norm": lambda c: lambda: C.grad_layers(
        c.model, [m for m in c.model.modules() if isinstance(m, nn.BatchNorm2d)], c.x, c.t, also_input=True),
    "ablation: forward + tails": _ablation_tail,
    "K = 512 masked forwards": lambda c: _masked_forwards(c, 512, c.chunk),
    "occluded forwards": lambda c: _masked_forwards(c, _windows(c), 64),
    "masked forwards": lambda c: _masked_forwards(c, c.masks, 64),
}


# --------------------------------------------------------------------------------------------
# Peers, built per call (pytorch-grad-cam and torchcam hold hooks for their object's life: they are
# released after each call, so that they never run during another contender's call).

def _pgc(cls_name: str, layers: str = "layer4", one: bool = False, **options):
    def build(c: Ctx):
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        x, t = (c.x1, c.t1) if one else (c.x, c.t)
        targets = [ClassifierOutputTarget(int(i)) for i in t]
        target_layers = [getattr(c.model, layers)] if layers else []

        def run():
            extractor = getattr(pytorch_grad_cam, cls_name)(model=c.model, target_layers=target_layers, **options)
            try:
                return extractor(input_tensor=x, targets=targets)
            finally:
                extractor.activations_and_grads.release()
                c.model.zero_grad(set_to_none=True)
        return run
    return build


def _captum(cls_name: str, twin: bool = False, one: bool = False, layer: Optional[str] = None, **options):
    def build(c: Ctx):
        import captum.attr
        model = c.twin if twin else c.model
        x, t = (c.x1, c.t1) if one else (c.x, c.t)
        opts = {k: (v(c) if isinstance(v, types.LambdaType) and v.__name__ == "<lambda>" else v)
                for k, v in options.items()}
        if cls_name == "NoiseTunnel":
            method = captum.attr.NoiseTunnel(captum.attr.Saliency(model))
            return lambda: method.attribute(x, target=t, **opts)
        cls = getattr(captum.attr, cls_name)
        method = cls(model, getattr(model, layer)) if layer else cls(model)
        return lambda: method.attribute(x, target=t, **opts)
    return build


def _zennit(composite: str):
    def build(c: Ctx):
        from zennit.composites import COMPOSITES
        from zennit.torchvision import ResNetCanonizer
        onehot = torch.nn.functional.one_hot(c.t, 1000).to(c.x.dtype)

        def run():
            x = c.x.detach().requires_grad_(True)
            with COMPOSITES[composite](canonizers=[ResNetCanonizer()]).context(c.model) as m:
                out = m(x)
                return torch.autograd.grad(out, x, grad_outputs=onehot * out)[0]
        return run
    return build


def _torchcam_cam(c: Ctx):
    from torchcam.methods import CAM

    def run():
        extractor = CAM(c.model, target_layer="layer4", fc_layer="fc")
        try:
            with torch.no_grad():
                scores = c.model(c.x)
            return extractor(class_idx=c.t.tolist(), scores=scores)
        finally:
            extractor.remove_hooks()
    return run


# --------------------------------------------------------------------------------------------
# The table of methods: one entry each.

Builder = Callable[[Ctx], Callable[[], object]]


@dataclass
class Entry:
    name: str
    ours: Builder
    floor: Union[str, Builder]
    peers: Dict[str, Builder] = field(default_factory=dict)
    no_grad: bool = False        # run every contender under torch.no_grad() (forward-only methods)
    heavy: bool = False          # one forward per channel: one round, no warm-up (pytorch-grad-cam's take minutes)


def _ours(method: Callable, one: bool = False, **options) -> Builder:
    def build(c: Ctx):
        x, t = (c.x1, c.t1) if one else (c.x, c.t)
        opts = {k: (v(c) if isinstance(v, types.LambdaType) and v.__name__ == "<lambda>" else v)
                for k, v in options.items()}
        return lambda: method(c.fn, c.params, x, t, **opts)
    return build


def _smooth_saliency(c: Ctx):
    smoothed = tx.smooth(tx.saliency, samples=c.samples, stdev=0.15, generator=c.gen())
    return lambda: smoothed(c.fn, c.params, c.x, c.t)


ENTRIES = [
    Entry("saliency", _ours(tx.saliency), "forward + backward to x",
          {"captum Saliency": _captum("Saliency", abs=False)}),
    Entry("input_x_gradient", _ours(tx.input_x_gradient), "forward + backward to x",
          {"captum InputXGradient": _captum("InputXGradient")}),
    Entry("smooth(saliency)", _smooth_saliency, "samples x (forward + backward to x)",
          {"captum NoiseTunnel(Saliency)": _captum("NoiseTunnel", nt_samples=lambda c: c.samples,
                                                   nt_samples_batch_size=1, stdevs=0.15, abs=False)}),
    Entry("integrated_gradients", _ours(tx.integrated_gradients, steps=lambda c: c.steps, batch_size=64),
          "steps x (forward + backward to x)",
          {"captum IntegratedGradients": _captum("IntegratedGradients", n_steps=lambda c: c.steps,
                                                 internal_batch_size=64)}),
    Entry("gradient_shap", _ours(tx.gradient_shap, baselines=lambda c: c.baselines, samples=lambda c: c.samples,
                                 generator=lambda c: c.gen()),
          "samples x (forward + backward to x)",
          {"captum GradientShap": _captum("GradientShap", baselines=lambda c: c.baselines,
                                          n_samples=lambda c: c.samples)}),
    Entry("deeplift", _ours(tx.deeplift), "forward + backward to x",
          {"captum DeepLift (ReLUs split)": _captum("DeepLift", twin=True)}),
    Entry("deeplift_shap", _ours(tx.deeplift_shap, baselines=lambda c: c.baselines), "4 x (forward + backward to x)",
          {"captum DeepLiftShap (ReLUs split)": _captum("DeepLiftShap", twin=True, baselines=lambda c: c.baselines)}),
    Entry("lrp", _ours(tx.lrp), "forward + backward to x", {"zennit epsilon_plus_flat": _zennit("epsilon_plus_flat")}),
    Entry("guided_backprop", _ours(tx.guided_backprop), "forward + backward to x",
          {"captum GuidedBackprop (ReLUs split)": _captum("GuidedBackprop", twin=True)}),
    Entry("cam", _ours(tx.cam, layer="layer4", fc="fc"), "forward + hook on layer4",
          {"torchcam CAM": _torchcam_cam}, no_grad=True),
    Entry("grad_cam", _ours(tx.grad_cam, layer="layer4"), "forward + backward to layer4",
          {"pytorch-grad-cam GradCAM": _pgc("GradCAM"),
           "captum LayerGradCam": _captum("LayerGradCam", layer="layer4", relu_attributions=True)}),
    Entry("grad_cam_pp", _ours(tx.grad_cam_pp, layer="layer4"), "forward + backward to layer4",
          {"pytorch-grad-cam GradCAMPlusPlus": _pgc("GradCAMPlusPlus")}),
    Entry("layer_cam", _ours(tx.layer_cam, layer="layer4"), "forward + backward to layer4",
          {"pytorch-grad-cam LayerCAM": _pgc("LayerCAM")}),
    Entry("xgrad_cam", _ours(tx.xgrad_cam, layer="layer4"), "forward + backward to layer4",
          {"pytorch-grad-cam XGradCAM": _pgc("XGradCAM")}),
    Entry("hires_cam", _ours(tx.hires_cam, layer="layer4"), "forward + backward to layer4",
          {"pytorch-grad-cam HiResCAM": _pgc("HiResCAM")}),
    Entry("eigen_cam", _ours(tx.eigen_cam, layer="layer4"), "forward + hook on layer4",
          {"pytorch-grad-cam EigenCAM": _pgc("EigenCAM")}, no_grad=True),
    Entry("fullgrad", _ours(tx.fullgrad), "forward + backward to x and every batch norm",
          {"pytorch-grad-cam FullGrad": _pgc("FullGrad", layers="")}),
    Entry("score_cam (1 image)", _ours(tx.score_cam, one=True, layer="layer4", batch_size=32), "K = 512 masked forwards",
          {"pytorch-grad-cam ScoreCAM": _pgc("ScoreCAM", one=True)}, no_grad=True, heavy=True),
    Entry("ablation_cam (1 image)", _ours(tx.ablation_cam, one=True, layer="layer4", batch_size=32),
          "ablation: forward + tails",
          {"pytorch-grad-cam AblationCAM": _pgc("AblationCAM", one=True, batch_size=32)}, no_grad=True,
          heavy=True),
    Entry("occlusion (1 image)", _ours(tx.occlusion, one=True, window=lambda c: (3, c.window, c.window),
                                       batch_size=64), "occluded forwards",
          {"captum Occlusion": _captum("Occlusion", one=True, sliding_window_shapes=lambda c: (3, c.window, c.window),
                                       strides=lambda c: (3, c.window, c.window), perturbations_per_eval=64)},
          no_grad=True),
    Entry("rise (1 image)", _ours(tx.rise, one=True, num_masks=lambda c: c.masks, batch_size=64,
                                  generator=lambda c: c.gen()), "masked forwards", no_grad=True),
]


def measure(entry: Entry, c: Ctx, rounds: int, peers: bool = True, full_heavy: bool = False, warmup: bool = True):
    floor = FLOORS[entry.floor](c) if isinstance(entry.floor, str) else entry.floor(c)
    contenders = {f"floor: {entry.floor if isinstance(entry.floor, str) else 'own'}": floor,
                  "torchex_fn": entry.ours(c)}
    if peers:
        contenders.update({name: build(c) for name, build in entry.peers.items()})
    with torch.no_grad() if entry.no_grad else torch.enable_grad():
        if entry.heavy and not full_heavy:
            return C.medians(C.race(contenders, 1, warmup=False))
        return C.medians(C.race(contenders, rounds, warmup=warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", help="names (prefixes) of the methods to run; default all")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --quick)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--size", type=int, default=None, help="default 224 (112 with --quick)")
    parser.add_argument("--steps", type=int, default=32, help="integrated gradients' path points")
    parser.add_argument("--samples", type=int, default=16, help="smooth / gradient_shap samples")
    parser.add_argument("--masks", type=int, default=512, help="RISE masks")
    parser.add_argument("--quick", action="store_true", help="batch 2 at 112 x 112, 2 rounds, 8 steps and samples")
    parser.add_argument("--no-peers", action="store_true", help="floor and torchex_fn only")
    parser.add_argument("--heavy-rounds", action="store_true",
                        help="also give score_cam and ablation_cam --rounds and a warm-up (default: one round)")
    parser.add_argument("--no-warmup", action="store_true", help="no warm-up call (for the slow methods on a loaded "
                        "machine; the layer-shape memo is then filled in the first round)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(e.name for e in ENTRIES))
        return
    C.setup(args.threads)
    rounds = args.rounds or (2 if args.quick else 3)
    batch = args.batch or (2 if args.quick else 8)
    size = args.size or (112 if args.quick else 224)
    steps, samples = (8, 8) if args.quick else (args.steps, args.samples)
    entries = [e for e in ENTRIES if not args.methods or any(e.name.startswith(m) for m in args.methods)]
    c = Ctx(batch, size, steps, samples, args.masks)
    print(C.machine(args.threads, f"resnet18 {size}x{size}, batch {batch}, {rounds} rounds, {steps} IG steps, "
                                  f"{samples} samples, {args.masks} RISE masks"), flush=True)
    rows = []
    for e in entries:
        times = measure(e, c, rounds, peers=not args.no_peers, full_heavy=args.heavy_rounds,
                        warmup=not args.no_warmup)
        names = list(times)
        floor, ours = times[names[0]], times[names[1]]
        for name in names:
            peer_ratios = " / ".join(C.ratio(times[name], times[p]) for p in names[2:])
            rows.append((e.name, name, f"{1000 * times[name]:.1f}", C.ratio(times[name], floor), peer_ratios))
        print(f"  {e.name}: ours / floor {ours / floor:.3f}"
              + "".join(f", ours / {p} {ours / times[p]:.3f}" for p in names[2:]) + f" (load {C.load()})",
              flush=True)
    print(f"\nload average at the end: {C.load()}\n")
    print(C.table(["method", "contender", "ms / call", "ratio to floor", "ratio to peer(s)"], rows, right=(2, 3, 4)))


if __name__ == "__main__":
    main()
