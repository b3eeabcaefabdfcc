"""The tiny runs of the store's fault tests (tests/composite/test_store_faults.py): a seeded model, a data set
built example by example from seeds, and ``killable``, a run started in a child process (forked from a
forkserver that has imported torch once, so that a child starts in milliseconds) to be killed at a random time.

The model's stem is a 7x7 stride-2 convolution with 64 channels (ResNet's), the smallest layer found whose
result on CPU depends on the number of threads (at 3 threads against 1, ~1e-9): the thread-pinning test
needs a computation that changes with the thread count.
"""
import multiprocessing
import time
from pathlib import Path

import torch

import torchex_fn as tx
from torchex_fn.composite.runner import store


def stem_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential()
        net.add_module("stem", torch.nn.Conv2d(3, 64, 7, stride=2, padding=3))
        net.add_module("relu", torch.nn.ReLU())
        net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
        net.add_module("flat", torch.nn.Flatten())
        net.add_module("fc", torch.nn.Linear(64, 5))
    return net.eval()


class Images(torch.utils.data.Dataset):
    """Example ``i`` drawn from a generator seeded with ``i``: the same in every process."""

    def __init__(self, n, size=16):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(5000 + i)
        return torch.randn(3, self.size, self.size, generator=g), i % 5


def run(out, n=12, batch_size=2, **kw):
    """``attribute_dataset(saliency)`` of the stem model over ``Images(n)`` into ``out``."""
    fn, params = tx.functionalize(stem_model())
    return tx.attribute_dataset(tx.saliency, fn, params, Images(n), out=out, batch_size=batch_size,
                                progress=False, **kw)


def killable(out, n, batch_size, threads):
    """The child of the SIGKILL test: the same run, with ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    run(out, n, batch_size)


# ------------------------------------------------------- the format 1 store of tests/references/store_format_1
def format_1_model():
    """The model of tests/references/store_format_1.py (the same lines)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 3))
    return net.eval()


def format_1_data():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 3, 6, 6, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 2, -1, 1]))


def hold_the_lock(out, ready):
    """A second process that holds ``out``'s lock until it is killed."""
    lock = store.Lock.acquire(Path(out))
    ready.set()
    time.sleep(120)
    lock.release()


def forkserver():
    """The multiprocessing context of these tests: children forked from a server that imported torch, its
    compiler stack (``torch.func``'s first call imports it: seconds) and torchex_fn once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torchex_fn", "support.store_runs"])
    return ctx
