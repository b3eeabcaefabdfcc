"""The demo prints tx.evaluate's table for its methods: the printed table and evaluation.csv equal tx.evaluate
called directly on the same model, images and methods (each rebuilt here from the public API)."""
import csv

import pytest
import torch

import torchex_fn as tx
from torchex_fn import datasets
from torchex_fn.__main__ import main
from torchex_fn.data import demo_model as _demo_model

NUM, SEED, MASKS = 4, 0, 32


def demo_methods():
    """The demo's methods and the map each is ranked by, written out (not imported from the demo)."""
    def rise(fn, params, x, y):
        with torch.no_grad():
            return tx.rise(fn, params, x, y, num_masks=MASKS, cell_size=8, normalization="per_pixel",
                           generator=torch.Generator().manual_seed(SEED))

    def random(fn, params, x, y):
        return torch.rand(x.shape[0], 1, *x.shape[2:], generator=torch.Generator().manual_seed(SEED))

    return {
        "saliency": lambda fn, p, x, y: tx.saliency(fn, p, x, y).abs().amax(dim=1, keepdim=True),
        "input_x_gradient": lambda fn, p, x, y: tx.input_x_gradient(fn, p, x, y).sum(dim=1, keepdim=True),
        "cam": lambda fn, p, x, y: tx.cam(fn, p, x, y, layer="features", fc="fc"),
        "grad_cam": lambda fn, p, x, y: tx.grad_cam(fn, p, x, y, layer="features"),
        "deeplift": lambda fn, p, x, y: tx.deeplift(fn, p, x, y, baseline=0.0).sum(dim=1, keepdim=True),
        "rise": rise,
        "random (baseline)": random,
    }


def test_the_printed_table_is_tx_evaluate_called_directly(tmp_path, capsys):
    pytest.importorskip("PIL")
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--num", str(NUM), "--rows", "1", "--epochs", "1", "--train-size", "128",
                 "--rise-masks", str(MASKS), "--step", "512", "--seed", str(SEED), "--cache-dir", str(tmp_path),
                 "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out

    config = _demo_model.TrainConfig(epochs=1, train_size=128)
    trained = _demo_model.load_or_train(config, cache=tmp_path, progress=False)
    assert trained.cached                                         # the very weights the demo trained
    fn, params = tx.functionalize(trained.model)
    data = datasets.shapes(NUM, seed=SEED + 20_000, difficulty=config.difficulty)
    direct = tx.evaluate(demo_methods(), fn, params, data.images, data.labels, mask=data.masks,
                         metrics=["sparseness", "complexity", "relevance_mass_accuracy", "relevance_rank_accuracy"])

    table = str(direct)
    assert table in printed
    assert table.splitlines()[0].split()[:3] == ["method", "sparseness", "↑"]
    assert len(table.splitlines()) == 2 + 7                       # header, rule, seven methods

    with open(out / "evaluation.csv") as f:
        saved = list(csv.DictReader(f))
    rows = direct.rows()
    assert [(r["method"], r["metric"]) for r in saved] == [(r["method"], r["metric"]) for r in rows]
    for got, want in zip(saved, rows):                            # the full-precision values, not the rounded ones
        assert float(got["mean"]) == want["mean"] and float(got["std"]) == want["std"]
        assert int(got["n"]) == want["n"] and got["better"] == want["better"]
    # one cell by hand: grad_cam's sparseness is the mean of tx.metrics.sparseness over the images
    maps = tx.grad_cam(fn, params, data.images, data.labels, layer="features")
    by_hand = tx.metrics.sparseness(maps).double().mean()
    assert direct.mean("grad_cam", "sparseness") == pytest.approx(float(by_hand), rel=1e-12)
