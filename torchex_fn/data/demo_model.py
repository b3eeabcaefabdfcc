"""The demo's small CNN, trained on :func:`torchex_fn.datasets.shapes`, with an on-disk weight cache.

The network ends in global average pooling and one linear layer, so CAM applies: its last
convolutional block is named ``features`` and its linear layer ``fc``. Training is deterministic on
the CPU (fixed seeds, a private ``torch.Generator`` for the data order, the global RNG restored
afterwards), takes well under a minute on two CPU cores, and its weights are cached in
``$TORCHEX_FN_CACHE`` or ``$XDG_CACHE_HOME/torchex_fn`` (default ``~/.cache/torchex_fn``), in a file
keyed by a hash of the training configuration and the torch version, so that later runs load them
at once. Weights are not shipped in the package: they are cheap to rebuild and a cache keyed by the
torch version cannot go stale.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import synthetic

__all__ = ["DemoNet", "TrainConfig", "TrainResult", "train", "load_or_train", "cache_dir", "cache_path", "accuracy"]


class DemoNet(nn.Module):
    """A small CNN: ``stem`` (two convs, stride 2 then max-pool) -> ``features`` -> GAP -> ``fc``.

    For 64 x 64 inputs ``features`` outputs ``[B, 4 * width, 16, 16]``.

    Args:
      num_classes: Outputs of ``fc``. Default: 4.
      width: Channels of the first convolution. Default: 16.
    """

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (its hash names the cache file).

    Attributes:
      train_size: Training images per epoch (a fresh draw each epoch). Default: 2048.
      test_size: Held-out images for the reported accuracy. Default: 512.
      epochs: Passes (each over freshly generated images). Default: 8.
      batch_size: Default: 64.
      lr: Peak learning rate of AdamW with a one-cycle schedule. Default: 0.01.
      width: :class:`DemoNet` width. Default: 16.
      difficulty: Passed to :func:`~torchex_fn.datasets.shapes`. Default: 0.3.
      seed: Seeds the weights, the data and the data order. Default: 0.
    """

    train_size: int = 2048
    test_size: int = 512
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.01
    width: int = 16
    difficulty: float = 0.3
    seed: int = 0

    def key(self) -> str:
        """A short hash of the configuration, the model's code version and the torch version."""
        blob = json.dumps({**dataclasses.asdict(self), "torch": torch.__version__, "model": _MODEL_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_MODEL_VERSION = 1
_TEST_SEED_OFFSET = 10_000  # the test set's seed is seed + this; demo batches use other seeds


class TrainResult(NamedTuple):
    """What :func:`load_or_train` returns.

    Attributes:
      model: The trained :class:`DemoNet`, in eval mode.
      accuracy: Accuracy on ``config.test_size`` held-out images.
      seconds: Training time (0 when loaded from the cache).
      path: The cache file (None when caching is off).
      cached: True when the weights came from the cache.
    """

    model: DemoNet
    accuracy: float
    seconds: float
    path: Optional[Path]
    cached: bool


def cache_dir() -> Path:
    """``$TORCHEX_FN_CACHE``, else ``$XDG_CACHE_HOME/torchex_fn``, else ``~/.cache/torchex_fn``."""
    env = os.environ.get("TORCHEX_FN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchex_fn"


def cache_path(config: TrainConfig, directory: Union[str, Path, None] = None) -> Path:
    """The weight file for ``config`` in ``directory`` (default :func:`cache_dir`)."""
    return Path(directory if directory is not None else cache_dir()) / f"demo_net-{config.key()}.pt"


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` (used in eval mode) on ``images``."""
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        out = model(images[start:start + batch_size])
        correct += int((out.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def train(config: TrainConfig = TrainConfig(), *, progress: bool = True) -> TrainResult:
    """Train a :class:`DemoNet` on freshly drawn :func:`~torchex_fn.datasets.shapes` images.

    Deterministic: the same configuration gives the same weights on the same machine and torch
    version. The global RNG is saved and restored, so calling this changes no global state.

    Args:
      config: The training configuration.
      progress: Show a tqdm bar over the steps. Default: True.

    Returns:
      :class:`TrainResult` (``path=None``, ``cached=False``).

    Cost: about ``epochs * train_size`` forward and backward passes of a ~40k-parameter CNN on
    64 x 64 images (10 to 30 s on two CPU cores).
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = DemoNet(len(synthetic.CLASSES), config.width)
        gen = torch.Generator().manual_seed(config.seed)
        steps_per_epoch = -(-config.train_size // config.batch_size)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr,
                                                       total_steps=config.epochs * steps_per_epoch)
        model.train()
        bar = tqdm(total=config.epochs * steps_per_epoch, desc="train demo model", disable=not progress,
                   leave=False, unit="step")
        try:
            for epoch in range(config.epochs):
                data = synthetic.shapes(config.train_size, seed=config.seed * 1000 + epoch + 1,
                                       difficulty=config.difficulty)
                order = torch.randperm(config.train_size, generator=gen)
                for step in range(steps_per_epoch):
                    index = order[step * config.batch_size:(step + 1) * config.batch_size]
                    loss = F.cross_entropy(model(data.images[index]), data.labels[index])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.detach():.3f}", refresh=False)
        finally:
            bar.close()
        model.eval()
    test = synthetic.shapes(config.test_size, seed=config.seed + _TEST_SEED_OFFSET, difficulty=config.difficulty)
    acc = accuracy(model, test.images, test.labels)
    return TrainResult(model, acc, time.perf_counter() - start_time, None, False)


def load_or_train(config: TrainConfig = TrainConfig(), *, cache: Union[bool, str, Path] = True,
                  progress: bool = True, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Load the demo model for ``config`` from the cache, or train it and cache it.

    Args:
      config: The training configuration (its hash names the cache file).
      cache: True (default) for :func:`cache_dir`, a folder, or False to always train and write nothing.
      progress: Show a tqdm bar while training. Default: True.
      log: Called with one-line status messages (e.g. ``print``). Default: silent.

    Returns:
      :class:`TrainResult`; the model is in eval mode.

    Raises:
      OSError: the cache folder cannot be created or written.
    """
    say = log or (lambda _msg: None)
    path = None if cache is False else cache_path(config, None if cache is True else cache)
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DemoNet(len(synthetic.CLASSES), config.width)
        model.load_state_dict(state["model"])
        model.eval()
        say(f"loaded demo model from {path} (test accuracy {state['accuracy']:.3f})")
        return TrainResult(model, float(state["accuracy"]), 0.0, path, True)
    say("training the demo model (once; the weights are cached)" if path is not None else "training the demo model")
    result = train(config, progress=progress)
    say(f"trained in {result.seconds:.1f} s, test accuracy {result.accuracy:.3f}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"model": result.model.state_dict(), "accuracy": result.accuracy,
                    "config": dataclasses.asdict(config)}, tmp)
        os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
        say(f"cached the weights in {path}")
    return result._replace(path=path)
