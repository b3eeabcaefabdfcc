"""Writes ``store_format_1/``: a store of format 1 (``torchex_fn.attributions/1``, no checksums), made with
the torchex_fn of commit 924160e, the last one that wrote format 1, so that tests/composite/test_store_faults.py
reads a store really written by an older version. To write it again, run this file with that version first on
the path::

    git worktree add /tmp/v1 924160e && PYTHONPATH=/tmp/v1 python tests/references/store_format_1.py

The model and data are built here and again in the test: saliency of a seeded 3-class CNN over 5 seeded
3x6x6 examples (example 3 unlabeled: -1), in batches of 2.
"""
import pathlib
import shutil

import torch

import torchex_fn as tx

OUT = pathlib.Path(__file__).resolve().parent / "store_format_1"


def model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 3))
    return net.eval()


def data():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5, 3, 6, 6, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 2, -1, 1]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    fn, params = tx.functionalize(model())
    store = tx.attribute_dataset(tx.saliency, fn, params, data(), out=OUT, batch_size=2, progress=False)
    assert store._index["format"] == "torchex_fn.attributions/1", "run this with the version that writes format 1"
    print(store)  # noqa: T201  (a script: says what it wrote)
