"""GPU timings: torchex_fn against the bare floors and against captum / pytorch-grad-cam, in one process.

Models (torchvision, random init, eval mode), 224 x 224:

* resnet50 at batch 64 and resnet18 at batch 8: saliency, Grad-CAM (layer4), DeepLIFT,
  integrated gradients (32 steps, Gauss-Legendre, one path point per forward for every library),
  each against its floor and against captum (and pytorch-grad-cam for Grad-CAM);
* RISE (1,000 masks, 7 x 7 cells, forwards of 64 masked images) against ``ceil(N * B / 64)`` bare
  forward passes of 64 images; on resnet50 over the first ``--rise-images`` images of the batch
  (default 4: 4,000 forwards per call), on resnet18 over the whole batch of 8;
* ``tx.attribute_dataset(tx.grad_cam, ...)`` over an in-memory data set of ``--dataset-size``
  images (stored as float16 maps in a temporary folder) against ``tx.grad_cam`` called on the same
  batches in a loop (the host-to-device copy included), as examples per second.
* a language model at length (issue 18): a GPT-2-small-shaped ``GPT2LMHeadModel`` (random weights, float32,
  SDPA), prompts of ``--llm-prompts`` tokens (default 1,024 and 4,096) and 32 teacher-forced output tokens,
  input x gradient at ``transformer.wte``: ``tx.continuation_attribution`` at ``batch_size`` 1, 4, 8 and 32
  and at 4 with ``checkpoint=True``, against captum's ``LLMGradientAttribution(LayerGradientXActivation)``
  and a floor (one forward with the 33 scored positions' logits + 32 backwards to the embeddings). On a GPU
  each row also reports the peak of ``torch.cuda.max_memory_allocated`` over one call, above the weights.

Floors: *saliency* and *DeepLIFT*: ``model(x)`` + ``torch.autograd.grad`` to the input; *Grad-CAM*:
``model(x)`` with a forward hook on layer4 + ``torch.autograd.grad`` to its output; *integrated
gradients*: 32 such input gradients of batch B; *RISE*: bare forwards under ``torch.no_grad``.
captum's DeepLift runs on a copy of the model whose reused ReLU modules are split into one module
per use (it raises on torchvision's blocks as they are); the other contenders use the model itself.

Timing: every contender is warmed up, then the contenders run interleaved round-robin; each round
times ``--number`` calls between two CUDA events (``torch.cuda.synchronize`` before and after); the
median round is reported. Goals (on a GPU): saliency and Grad-CAM <= 1.10 x floor, DeepLIFT <= 0.75
x captum, RISE <= 1.10 x N forwards.

Usage::

    python benchmarks/gpu.py                          # one GPU, about 4-6 minutes on an H100 / H200
    python benchmarks/gpu.py --device cpu --quick     # tiny sizes, a smoke run on the CPU (seconds)
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import shutil
import statistics
import tempfile
import time
import types
import warnings

import torch
from torch import nn

import torchex_fn as tx


# ---------------------------------------------------------------------------------------------
# timing

class Clock:
    """Seconds per call of ``fn``: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, number: int) -> float:
        self.sync()
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1000 / number
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number

    def race(self, contenders: dict, rounds: int, number: int) -> dict:
        for f in contenders.values():  # warm-up: cuDNN algorithm choice, the shape memo, captum's setup
            f()
        self.sync()
        times = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, f in contenders.items():
                times[name].append(self.time(f, number))
        return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# models

def _split_basic(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_b(out + identity)


def _split_bottleneck(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu_a(self.bn1(self.conv1(x)))
    out = self.relu_b(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu_c(out + identity)


def captum_ready_copy(model: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet with every reused / in-place ReLU split into fresh modules."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    twin = copy.deepcopy(model)
    twin.relu = nn.ReLU(inplace=False)
    for block in twin.modules():
        if isinstance(block, BasicBlock):
            block.relu_a, block.relu_b = nn.ReLU(), nn.ReLU()
            del block.relu
            block.forward = types.MethodType(_split_basic, block)
        elif isinstance(block, Bottleneck):
            block.relu_a, block.relu_b, block.relu_c = nn.ReLU(), nn.ReLU(), nn.ReLU()
            del block.relu
            block.forward = types.MethodType(_split_bottleneck, block)
    return twin


class _Images(torch.utils.data.Dataset):
    """``n`` (image, class) pairs held in memory (host), like a decoded data set."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------------------------

def bench_model(arch: str, batch: int, size: int, args, device, clock: Clock, rows: list) -> None:
    import torchvision
    from captum.attr import DeepLift, IntegratedGradients, LayerGradCam, Saliency
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval().to(device)
    twin = captum_ready_copy(model)
    fn, params = tx.functionalize(model)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device)
    tag = f"{arch} {batch}x{size}px"
    rounds, number = args.rounds, args.number

    def input_gradient(xs=x, t=target):
        xx = xs.detach().requires_grad_(True)
        return torch.autograd.grad(model(xx).gather(1, t[:, None]).sum(), xx)[0]

    def layer4_gradient():
        acts = []
        handle = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
        try:
            out = model(x)
        finally:
            handle.remove()
        return torch.autograd.grad(out.gather(1, target[:, None]).sum(), acts)

    def add(method, times, floor="floor", goal=""):
        for name, t in times.items():
            rows.append((tag, method, name, t, t / times[floor], goal if name.startswith("torchex_fn") else ""))

    add("saliency", clock.race({
        "floor": input_gradient,
        "torchex_fn.saliency": lambda: tx.saliency(fn, params, x, target),
        "captum Saliency": lambda: Saliency(model).attribute(x, target=target, abs=False),
    }, rounds, number), goal="<= 1.10 x floor")

    pg = GradCAM(model=model, target_layers=[model.layer4])
    pg_targets = [ClassifierOutputTarget(int(t)) for t in target.tolist()]
    add("grad_cam layer4", clock.race({
        "floor": layer4_gradient,
        "torchex_fn.grad_cam": lambda: tx.grad_cam(fn, params, x, target, layer="layer4"),
        "captum LayerGradCam": lambda: LayerGradCam(model, model.layer4).attribute(x, target=target,
                                                                                    relu_attributions=True),
        "pytorch-grad-cam GradCAM": lambda: pg(input_tensor=x, targets=pg_targets),
    }, rounds, number), goal="<= 1.10 x floor")
    pg.activations_and_grads.release()

    times = clock.race({
        "floor": input_gradient,
        "torchex_fn.deeplift": lambda: tx.deeplift(fn, params, x, target),
        "captum DeepLift": lambda: DeepLift(twin).attribute(x, target=target, baselines=0.0),
    }, rounds, number)
    add("deeplift", times)
    rows.append((tag, "deeplift", "torchex_fn / captum", times["torchex_fn.deeplift"],
                 times["torchex_fn.deeplift"] / times["captum DeepLift"], "<= 0.75 x captum"))

    steps = args.steps

    def ig_floor():
        for _ in range(steps):
            input_gradient()

    add(f"integrated_gradients ({steps} steps)", clock.race({
        "floor": ig_floor,
        "torchex_fn.integrated_gradients": lambda: tx.integrated_gradients(fn, params, x, target, steps=steps),
        "captum IntegratedGradients": lambda: IntegratedGradients(model).attribute(
            x, target=target, n_steps=steps, method="gausslegendre", internal_batch_size=batch),
    }, max(1, rounds // 2), 1))

    images = min(batch, args.rise_images if arch != "resnet18" else batch)
    xr, tr = x[:images], target[:images]
    masks, chunk = args.masks, args.rise_batch
    bare = torch.randn(chunk, 3, size, size, device=device)

    def rise_floor():
        with torch.no_grad():
            for _ in range(math.ceil(masks * images / chunk)):
                model(bare)

    def rise():
        gen = torch.Generator(device=device).manual_seed(0)
        return tx.rise(fn, params, xr, tr, num_masks=masks, cell_size=7, batch_size=chunk, generator=gen)

    add(f"rise ({masks} masks, {images} images)", clock.race({"floor": rise_floor, "torchex_fn.rise": rise},
                                                            max(1, rounds // 2), 1), goal="<= 1.10 x floor")

    # attribute_dataset: examples per second against a loop of grad_cam over the same batches
    n = args.dataset_size
    host_x = torch.randn(n, 3, size, size).pin_memory() if clock.cuda else torch.randn(n, 3, size, size)
    host_t = torch.randint(0, 1000, (n,))
    data = _Images(host_x, host_t)

    def loop():
        for start in range(0, n, batch):
            xb = host_x[start:start + batch].to(device, non_blocking=True)
            tb = host_t[start:start + batch].to(device, non_blocking=True)
            tx.grad_cam(fn, params, xb, tb, layer="layer4").to("cpu", torch.float16)

    def store():
        out = tempfile.mkdtemp(prefix="gpu_bench_")
        try:
            tx.attribute_dataset(tx.grad_cam, fn, params, data, out=out, batch_size=batch, progress=False,
                                 dtype=torch.float16, layer="layer4")
        finally:
            shutil.rmtree(out, ignore_errors=True)

    times = clock.race({"grad_cam loop (batches in memory)": loop, "torchex_fn.attribute_dataset": store},
                       max(1, rounds // 2), 1)
    for name, t in times.items():
        rows.append((tag, f"dataset of {n}: {n / t:.0f} examples/s", name, t,
                     t / times["grad_cam loop (batches in memory)"], ""))


def bench_llm(length: int, args, device, clock: Clock, rows: list) -> None:
    """Issue 18's rows: continuation attribution of 32 output tokens to a prompt of ``length`` tokens."""
    import sys
    from pathlib import Path

    import transformers
    from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import IntTokenizer   # the benchmarks' one token-id tokenizer

    n_out = 8 if args.quick else 32
    small = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=1000) if args.quick else {}
    cfg = transformers.GPT2Config(**{"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, **small},
                                  n_positions=length + n_out, attn_implementation="sdpa", bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    fn, params = tx.functionalize(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, cfg.vocab_size, (1, length), generator=g).to(device)
    generated = torch.randint(1, cfg.vocab_size, (n_out,), generator=g).to(device)
    ids = torch.cat([prompt, generated[None]], 1)
    tok = IntTokenizer()
    llm = LLMGradientAttribution(LayerGradientXActivation(model, model.transformer.wte), tok)
    text = TextTokenInput(" ".join(map(str, prompt[0].tolist())), tok)

    def floor():
        emb = model.transformer.wte(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, logits_to_keep=n_out + 1).logits[:, :-1]
        logp = torch.log_softmax(logits, -1)[0, torch.arange(n_out, device=device), generated]
        return [torch.autograd.grad(logp[j], emb, retain_graph=j < n_out - 1)[0] for j in range(n_out)]

    def ours(k, checkpoint=False):
        return lambda: tx.continuation_attribution(fn, params, prompt, generated, method="input_x_gradient",
                                                   layer="transformer.wte", batch_size=k, checkpoint=checkpoint)

    floor_name = f"floor (1 forward + {n_out} backwards)"
    contenders = {floor_name: floor}
    for k in (1, 4, 8, 32):
        contenders[f"torchex_fn batch_size={k}"] = ours(k)
    contenders["torchex_fn batch_size=4 checkpoint=True"] = ours(4, True)
    contenders["captum LLMGradientAttribution"] = lambda: llm.attribute(text, target=generated.cpu())
    peaks = {}
    if clock.cuda:   # the peak of one call above what is allocated before it (the weights, the ids)
        for name, f in contenders.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            f()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = clock.race(contenders, max(1, args.rounds // 2), 1)
    tag = f"gpt2 {cfg.n_layer} layers x {cfg.n_embd}, {length} + {n_out} tokens"
    captum = times["captum LLMGradientAttribution"]
    for name, t in times.items():
        memory = f"peak {peaks[name]:.0f} MiB above the weights; " if name in peaks else ""
        goal = "<= 0.5 x captum" if name == "torchex_fn batch_size=4" else ""
        rows.append((tag, f"input x gradient ({memory}vs captum {t / captum:.3f})", name, t,
                     t / times[floor_name], goal))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, e.g. on the CPU)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--number", type=int, default=None, help="calls per timed round")
    parser.add_argument("--rise-images", type=int, default=4)
    parser.add_argument("--llm-prompts", type=int, nargs="+", default=None,
                        help="prompt lengths of the language-model rows (default 1024 4096; --quick: 32)")
    parser.add_argument("--skip-llm", action="store_true", help="no language-model rows")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock = Clock(device)
    if args.quick:
        configs = [("resnet18", 2, 32), ("resnet50", 2, 32)]
        args.steps, args.masks, args.rise_batch, args.dataset_size = 4, 16, 16, 8
        args.rounds, args.number = args.rounds or 1, args.number or 1
    else:
        configs = [("resnet50", 64, 224), ("resnet18", 8, 224)]
        args.steps, args.masks, args.rise_batch, args.dataset_size = 32, 1000, 64, 1024
        args.rounds, args.number = args.rounds or 5, args.number or 3
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                             platform.machine())
    start = time.perf_counter()
    rows: list = []
    for arch, batch, size in configs:
        bench_model(arch, batch, size, args, device, clock, rows)
    for length in ([] if args.skip_llm else args.llm_prompts or ([32] if args.quick else [1024, 4096])):
        bench_llm(length, args, device, clock, rows)
    print(f"\n{where}, torch {torch.__version__}, {time.perf_counter() - start:.0f} s in all\n")
    print("| model | method | contender | ms / call | ratio | goal |")
    print("| --- | --- | --- | ---: | ---: | --- |")
    for tag, method, name, t, ratio, goal in rows:
        print(f"| {tag} | {method} | {name} | {1000 * t:.1f} | {ratio:.3f} | {goal} |")


if __name__ == "__main__":
    main()
