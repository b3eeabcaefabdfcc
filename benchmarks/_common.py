"""What the benchmarks share: thread setting, models, floors written with plain hooks, the interleaved timing
loop, and markdown tables.

Every benchmark runs its contenders in one process, round-robin (one call of each per round, after a
warm-up call each), and reports medians over rounds as ratios: to the floor (the work the method cannot
avoid, written with plain ``nn.Module`` hooks and ``torch.autograd.grad``) and to the peer library. On
a shared machine single calls swing with the load; ratios within one run are the comparable numbers.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")   # before tqdm is imported: pytorch-grad-cam's progress bars

import torch


def setup(threads: int = 2) -> None:
    """Torch threads, no warnings from the peers' imports, no progress bars (pytorch-grad-cam's tqdm)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    try:  # pytorch-grad-cam's ScoreCAM / AblationCAM draw progress bars on every call
        import functools

        import tqdm
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    except ImportError:
        pass


def resnet18(seed: int = 0) -> torch.nn.Module:
    """torchvision's resnet18, random weights (the cost does not depend on them), eval mode."""
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.resnet18().eval()


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f}"


def machine(threads: int, what: str = "") -> str:
    """One line: processor, cores, load average (as ``uptime`` prints it), torch, threads."""
    where = platform.processor() or platform.machine()
    line = (f"machine: {where}, {os.cpu_count()} cores, load average {load()}, torch {torch.__version__}, "
            f"{threads} threads")
    return line + (f", {what}" if what else "")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock_of(name: str) -> Callable[[], float]:
    """``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: the CPU seconds of this process,
    all its threads; on a shared, loaded machine it counts the work done, not the time spent waiting for a
    core, so with ``--threads 1`` it is the steadier measure)."""
    return CLOCKS[name]


def timeit(f: Callable[[], object], number: int = 1, sync: Callable[[], None] = lambda: None,
           clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``f``, over ``number`` calls, by ``clock``."""
    sync()
    start = clock()
    for _ in range(number):
        f()
    sync()
    return (clock() - start) / number


def race(contenders: Dict[str, Callable[[], object]], rounds: int, number: int = 1,
         sync: Callable[[], None] = lambda: None, warmup: bool = True,
         progress: Optional[Callable[[int, Dict[str, List[float]]], None]] = None,
         clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of each contender in each round, interleaved round-robin (after one warm-up call each,
    which also fills the library's layer-shape memo), by ``clock`` (see :func:`clock_of`)."""
    if warmup:
        for f in contenders.values():
            f()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, f in contenders.items():
            times[name].append(timeit(f, number, sync, clock))
        if progress is not None:
            progress(r, times)
    return times


def medians(times: Dict[str, Sequence[float]]) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def table(header: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A markdown table; columns whose index is in ``right`` are right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "" if a is None or b is None else f"{a / b:.3f}"


# --------------------------------------------------------------------------------------------
# Floors: the work a method cannot avoid, with plain hooks and autograd.

def hooked(layers: Sequence[torch.nn.Module], run: Callable[[], object], replace: Optional[Callable] = None):
    """``(run(), [output of each layer])`` with forward hooks on ``layers`` for the length of the call;
    ``replace(module, output) -> new output`` substitutes what the model continues with."""
    acts: List[torch.Tensor] = []

    def hook(module, inputs, output):
        if replace is not None:
            output = replace(module, output)
        acts.append(output)
        return output if replace is not None else None

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, acts


def grad_input(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Saliency's floor: one forward and ``autograd.grad`` of the target scores to the input."""
    xx = x.detach().requires_grad_(True)
    out = model(xx)
    return torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)[0]


def grad_layers(model: torch.nn.Module, layers: Sequence[torch.nn.Module], x: torch.Tensor,
                target: torch.Tensor, also_input: bool = False):
    """Grad-CAM's floor: one forward and ``autograd.grad`` of the target scores to the layers' outputs only."""
    xx = x.detach().requires_grad_(True) if also_input else x
    out, acts = hooked(layers, lambda: model(xx))
    return torch.autograd.grad(out.gather(1, target[:, None]).sum(), ([xx] if also_input else []) + acts)


class Calls:
    """The model calls an evaluation metric makes, recorded as ``(kind, images)``: ``"forward"`` for a bare
    forward, ``"explain"`` for a call of the explanation method (a forward and a backward for saliency); the
    model calls made inside an explanation are not recorded again.

    :meth:`hook` records the forwards of an ``nn.Module`` with a forward pre-hook (``functionalize``'s
    ``model_fn`` calls the module, so one hook serves both libraries); wrap the explanation method with
    :meth:`method`.
    """

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.inside = 0

    def method(self, method: Callable) -> Callable:
        def recorded(model_fn, params, x, target, *args, **kwargs):
            if not self.inside:
                self.calls.append(("explain", x.shape[0]))
            self.inside += 1
            try:
                return method(model_fn, params, x, target, *args, **kwargs)
            finally:
                self.inside -= 1
        return recorded

    def hook(self, model: torch.nn.Module):
        def pre(module, inputs):
            if not self.inside:
                self.calls.append(("forward", inputs[0].shape[0]))
        return model.register_forward_pre_hook(pre)

    def images(self, kind: str) -> int:
        return sum(n for k, n in self.calls if k == kind)

    def summary(self) -> str:
        """E.g. ``"200 fwd in 25 calls + 80 f+b in 10 calls"``."""
        parts = []
        for kind, label in (("forward", "fwd"), ("explain", "f+b")):
            calls = [n for k, n in self.calls if k == kind]
            if calls:
                parts.append(f"{sum(calls)} {label} in {len(calls)}")
        return " + ".join(parts) or "none"


def replay(model: torch.nn.Module, calls: Sequence[tuple], x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """The floor of a metric: the bare model calls it made (:class:`Calls`), batched as it batched them, on
    copies of ``x`` drawn once: ``model(x)`` without autograd for a forward, a forward and ``autograd.grad`` of
    the target scores to the input (saliency's floor) for an explanation."""
    largest = max((n for _, n in calls), default=1)
    reps = -(-largest // x.shape[0])
    images = x.repeat(reps, *([1] * (x.ndim - 1)))[:largest].contiguous()
    labels = target.repeat(reps)[:largest].contiguous()

    def run() -> None:
        for kind, n in calls:
            if kind == "forward":
                with torch.no_grad():
                    model(images[:n])
            else:
                grad_input(model, images[:n], labels[:n])
    return run


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def captum_ready_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a torchvision ResNet with every reused / in-place ReLU split into fresh modules, one per call.

    captum's module-hook methods (DeepLift, GuidedBackprop, LRP) refuse or mis-handle a ReLU module that
    ``BasicBlock`` calls twice; this copy computes the same function with one ``nn.ReLU()`` per call.
    """
    import copy
    import types

    from torchvision.models.resnet import BasicBlock

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu_a(self.bn1(self.conv1(x)))
        return self.relu_b(self.bn2(self.conv2(out)) + identity)

    twin = copy.deepcopy(model)
    twin.relu = torch.nn.ReLU()
    for block in twin.modules():
        if isinstance(block, BasicBlock):
            block.relu_a, block.relu_b = torch.nn.ReLU(), torch.nn.ReLU()
            del block.relu
            block.forward = types.MethodType(forward, block)
    return twin


class IntTokenizer:
    """Space-separated integers are token ids (what captum's TextTokenInput and result formatting call)."""

    def encode(self, text, return_tensors=None, add_special_tokens=True):
        ids = [int(t) for t in text.split()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return " ".join(str(i) for i in ([ids] if isinstance(ids, int) else ids))

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        return [int(t) for t in tokens]

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **kwargs):
        ids, offsets, pos = [], [], 0
        for t in text.split(" "):
            ids.append(int(t))
            offsets.append((pos, pos + len(t)))
            pos += len(t) + 1
        return {"input_ids": ids, "offset_mapping": offsets}
