"""Conductance and neuron timings: torchex_fn vs captum (same process, same inputs) and a plain-autograd floor.

Model: torchvision resnet18 (random weights, eval mode), batch 2 at 64 x 64 (``--batch``, ``--size``),
CPU, 2 threads, layer ``layer3``, 16 steps. Contenders, each with its floor (the work it cannot avoid,
written with a forward hook and ``torch.autograd.grad``, all path points of the ``B`` images in one forward, as
ours runs by default at these sizes):

* ``layer_conductance`` vs captum ``LayerConductance``: ``steps + 1`` forwards, backwards to the layer;
* ``internal_influence`` vs ``InternalInfluence``: ``steps`` forwards, backwards to the layer;
* ``neuron_conductance`` vs ``NeuronConductance``: ``steps`` forwards, a backward to the layer and one
  from the neuron to the input, both on the graph of the one forward (ours too, in a plain call);
* ``neuron(integrated_gradients)`` vs ``NeuronIntegratedGradients``: ``steps`` forwards to the layer
  and backwards from the neuron (the floor runs the layers up to ``layer3`` by hand; ours ends the model's
  forward at the layer, from the hook that reads the neuron).

captum evaluates all path points in one batch of ``steps x B`` images (its default
``internal_batch_size=None``); ours by default as many path points per forward as 2^20 elements allow on a
CPU (all of them at these sizes); two more lines run ours with captum's batch given explicitly.
Rounds are interleaved and the median is reported.

Usage (``PYTHONPATH=.`` so that the checkout's package is timed, not an installed one)::

    PYTHONPATH=. python benchmarks/bench_conductance.py            # 5 rounds, batch 2 at 64 x 64
    PYTHONPATH=. python benchmarks/bench_conductance.py --quick    # 2 rounds, batch 1 at 32 x 32
    PYTHONPATH=. python benchmarks/bench_conductance.py --threads 1 --clock cpu   # on a shared, loaded machine
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

import torchex_fn as tx  # noqa: E402
from torchex_fn.methods.path import quadrature  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # captum's import warns about torch.jit.script
    from captum.attr import InternalInfluence, LayerConductance, NeuronConductance, NeuronIntegratedGradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 1 at 32 x 32")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(C.CLOCKS), default="wall",
                        help="wall: perf_counter; cpu: process_time (steadier on a loaded machine, with --threads 1)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    batch = args.batch or (1 if args.quick else 2)
    size = args.size or (32 if args.quick else 64)
    steps = args.steps
    torch.set_num_threads(args.threads)
    model = C.resnet18()
    for p in model.parameters():
        p.requires_grad_(False)
    fn, params = tx.functionalize(model)
    x = torch.randn(batch, 3, size, size)
    target = torch.arange(batch) * 7 % 1000
    index = (5, 1, 1)
    layer = model.layer3

    def floor(nodes, to_layer=True, from_neuron=False, whole=True):
        """One forward of the ``len(nodes) B`` images x * a (all path points stacked, as ours runs by default
        since the defaults pick the path points per forward from the input's size); backward to the layer
        and/or from the neuron."""
        seen = {}
        def keep(module, inputs, output):
            # the parameters are frozen: without a tracked input the layer's output is a leaf to differentiate at
            seen["a"] = output if output.requires_grad else output.requires_grad_()
        handle = layer.register_forward_hook(keep)
        try:
            xs = torch.cat([x * a for a in nodes]).requires_grad_(from_neuron)
            targets = target.repeat(len(nodes))
            out = model(xs) if whole else model.layer3(model.layer2(model.layer1(model.maxpool(
                model.relu(model.bn1(model.conv1(xs)))))))
            acts = seen["a"] if whole else out
            if to_layer:
                torch.autograd.grad(out.gather(1, targets[:, None]).sum(), acts, retain_graph=from_neuron)
            if from_neuron:
                torch.autograd.grad(acts[(slice(None), *index)].sum(), xs)
        finally:
            handle.remove()

    def quiet(f):
        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return f()
        return call

    gl = quadrature("gausslegendre", steps)[0]
    gl1 = quadrature("gausslegendre", steps + 1)[0]
    trapezoid = quadrature("riemann_trapezoid", steps)[0]
    contenders = {
        "layer_conductance": lambda: tx.layer_conductance(fn, params, x, target, layer="layer3", steps=steps),
        "captum LayerConductance": quiet(lambda: LayerConductance(model, layer).attribute(x, target=target,
                                                                                          n_steps=steps)),
        "floor layer_conductance": lambda: floor(gl1),
        "layer_conductance, batch_size=(steps + 1) B": lambda: tx.layer_conductance(
            fn, params, x, target, layer="layer3", steps=steps, batch_size=(steps + 1) * batch),
        "internal_influence": lambda: tx.internal_influence(fn, params, x, target, layer="layer3", steps=steps),
        "captum InternalInfluence": quiet(lambda: InternalInfluence(model, layer).attribute(x, target=target,
                                                                                            n_steps=steps)),
        "floor internal_influence": lambda: floor(gl),
        "neuron_conductance": lambda: tx.neuron_conductance(fn, params, x, target, layer="layer3", index=index,
                                                            steps=steps),
        "captum NeuronConductance": quiet(lambda: NeuronConductance(model, layer).attribute(
            x, index, target=target, n_steps=steps)),
        "floor neuron_conductance": lambda: floor(trapezoid, from_neuron=True),
        "neuron_conductance, batch_size=steps B": lambda: tx.neuron_conductance(
            fn, params, x, target, layer="layer3", index=index, steps=steps, batch_size=steps * batch),
        "neuron(integrated_gradients)": lambda: tx.neuron(tx.integrated_gradients, layer="layer3", index=index)(
            fn, params, x, steps=steps),
        "captum NeuronIntegratedGradients": quiet(lambda: NeuronIntegratedGradients(model, layer).attribute(
            x, index, n_steps=steps)),
        "floor neuron(integrated_gradients)": lambda: floor(gl, to_layer=False, from_neuron=True, whole=False),
    }
    times = C.race(contenders, rounds, clock=C.clock_of(args.clock))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(C.machine(args.threads, f"resnet18, batch {batch} at {size}x{size}, layer3, {steps} steps, "
                                  f"{rounds} rounds, {args.clock} clock"))
    rows = []
    names = list(contenders)
    for ours in ("layer_conductance", "internal_influence", "neuron_conductance", "neuron(integrated_gradients)"):
        peer = names[names.index(ours) + 1]   # listed right after ours
        rows.append([ours, f"{med[ours]:.3f}", f"{med[peer]:.3f}", f"{med['floor ' + ours]:.3f}",
                     C.ratio(med[ours], med[peer]), C.ratio(med[ours], med["floor " + ours])])
    print(C.table(["method", "ours (s)", "captum (s)", "floor (s)", "ours / captum", "ours / floor"], rows,
                  right=(1, 2, 3, 4, 5)))
    # captum evaluates every path point in one batch: ours with the same batch
    for ours, peer in (("layer_conductance, batch_size=(steps + 1) B", "captum LayerConductance"),
                       ("neuron_conductance, batch_size=steps B", "captum NeuronConductance")):
        print(f"{ours}: {med[ours]:.3f} s, ours / captum = {C.ratio(med[ours], med[peer])}")


if __name__ == "__main__":
    main()
