"""The demo (``python -m torchex_fn demo``), its model and cache, and torchex_fn.viz."""
import csv
import sys

import pytest
import torch

import torchex_fn as tx
from torchex_fn import datasets, metrics, viz
from torchex_fn.data import demo_model as _demo_model
from torchex_fn.__main__ import main

TINY = _demo_model.TrainConfig(train_size=128, test_size=64, epochs=1, batch_size=64)


# -------------------------------------------------------------------------------------------- viz
def test_overlay_shapes_and_range():
    image = torch.rand(3, 16, 16)
    attribution = torch.randn(1, 16, 16) * 100
    out = viz.overlay(image, attribution)
    assert out.shape == (3, 16, 16) and out.min() >= 0 and out.max() <= 1
    batch = viz.overlay(torch.rand(2, 3, 16, 16), torch.randn(2, 1, 4, 4), cmap="viridis", alpha=0.3)
    assert batch.shape == (2, 3, 16, 16) and batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(viz.overlay(image, attribution, alpha=0.0), image)


def test_colormaps_hit_their_anchors():
    ends = viz.colorize(torch.tensor([[0.0, 0.5, 1.0]]), "jet")  # [3, 1, 3]
    torch.testing.assert_close(ends[:, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close(ends[:, 0, 2], torch.tensor([0.5, 0.0, 0.0]))
    white = viz.colorize(torch.tensor([[0.5]]), "diverging")[:, 0, 0]
    torch.testing.assert_close(white, torch.ones(3))


def test_diverging_overlay_leaves_zero_attribution_untouched_and_shows_the_sign():
    image = torch.full((3, 4, 4), 0.5)
    attribution = torch.zeros(1, 4, 4)
    attribution[0, 0, 0], attribution[0, 0, 1] = 1.0, -1.0
    out = viz.overlay(image, attribution, cmap="diverging", alpha=1.0)
    torch.testing.assert_close(out[:, 3, 3], image[:, 3, 3])
    assert out[0, 0, 0] > out[2, 0, 0] and out[2, 0, 1] > out[0, 0, 1]  # red for +, blue for -


def test_overlay_errors():
    with pytest.raises(ValueError, match="overlay: expected alpha in"):
        viz.overlay(torch.rand(3, 4, 4), torch.rand(1, 4, 4), alpha=2)
    with pytest.raises(ValueError, match="overlay: unknown cmap 'jett'. Did you mean 'jet'"):
        viz.overlay(torch.rand(3, 4, 4), torch.rand(1, 4, 4), cmap="jett")
    with pytest.raises(ValueError, match="overlay: expected attribution of shape"):
        viz.overlay(torch.rand(2, 3, 4, 4), torch.rand(3, 1, 4, 4))


def test_save_grid_writes_a_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rows = [[torch.rand(3, 8, 8), torch.rand(1, 8, 8)], [torch.zeros(3, 8, 8), torch.ones(8, 8)]]
    path = viz.save_grid(rows, tmp_path / "sub" / "g.png", titles=["a", "b"], row_titles=["r1", "r2"], scale=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 2 * 24 and img.height > 2 * 24
    with pytest.raises(ValueError, match="save_grid: expected 2 titles"):
        viz.save_grid(rows, tmp_path / "h.png", titles=["a"])


def test_save_grid_without_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install torchex-fn\[viz\]"):
        viz.save_grid([[torch.rand(3, 4, 4)]], tmp_path / "x.png")


# ----------------------------------------------------------------------------- model and its cache
def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = _demo_model.train(TINY, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = _demo_model.train(TINY, progress=False)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_weights_are_cached_by_config(tmp_path):
    first = _demo_model.load_or_train(TINY, cache=tmp_path, progress=False)
    assert not first.cached and first.path.is_file() and first.path.parent == tmp_path
    second = _demo_model.load_or_train(TINY, cache=tmp_path, progress=False)
    assert second.cached and second.accuracy == first.accuracy
    for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(p, q)
    other = _demo_model.TrainConfig(train_size=128, test_size=64, epochs=1, seed=1)
    assert _demo_model.cache_path(other, tmp_path) != first.path


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHEX_FN_CACHE", str(tmp_path / "mine"))
    assert _demo_model.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TORCHEX_FN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _demo_model.cache_dir() == tmp_path / "xdg" / "torchex_fn"


# ------------------------------------------------------------------------------------------- demo
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("PIL")
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--num", "4", "--rows", "2", "--epochs", "1", "--train-size", "128",
                 "--rise-masks", "32", "--step", "256", "--no-cache", "--quiet"])
    assert code == 0
    assert (out / "grid.png").stat().st_size > 1000
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    names = [r["method"] for r in rows]
    assert names[:4] == ["saliency", "input_x_gradient", "cam", "grad_cam"]
    assert names[-1] == "random (baseline)"
    for row in rows:
        for key in ("pointing", "energy_pg", "deletion_auc", "insertion_auc"):
            assert 0 <= float(row[key]) <= 1
    assert float(rows[-1]["rand_rho"]) == 1.0  # a random map ignores the model: the sanity check flags it
    printed = capsys.readouterr().out
    assert "deletion_auc" in printed and "grad_cam" in printed


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        main(["demo", "--num", "0"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.slow
def test_trained_demo_model_is_accurate_and_grad_cam_localises(tmp_path):
    """Trains the default demo model (~20-50 s on 2 busy CPU cores) unless the user cache has it."""
    config = _demo_model.TrainConfig()
    cached = _demo_model.cache_path(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = _demo_model.load_or_train(config, cache=cached.parent if cached.is_file() else tmp_path,
                                       progress=False)
    torch.set_num_threads(threads)
    assert result.accuracy >= 0.95
    fn, params = tx.functionalize(result.model)
    data = datasets.shapes(64, seed=123, difficulty=config.difficulty)
    maps = tx.grad_cam(fn, params, data.images, data.labels, layer="features")
    assert metrics.pointing_game(maps, data.masks, tolerance=4).hit.float().mean() >= 0.85
    # RISE, same bar and tolerance, on half the batch with 250 masks (~10 s). Measured on these 64
    # images: per_pixel 1.00 (250 masks); the "paper" normalisation (divide by N p) is noisier and
    # reaches only 0.73-0.75 with 250-2000 masks (0.81-0.83 at tolerance 8), so it is not used here.
    with torch.no_grad():
        saliency = tx.rise(fn, params, data.images[:32], data.labels[:32], num_masks=250, cell_size=8,
                           normalization="per_pixel", generator=torch.Generator().manual_seed(0))
    assert metrics.pointing_game(saliency, data.masks[:32], tolerance=4).hit.float().mean() >= 0.85
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        random = torch.rand(maps.shape, generator=gen)
        ours = metrics.deletion(fn, params, data.images, maps, data.labels, step=128).auc.mean()
        chance = metrics.deletion(fn, params, data.images, random, data.labels, step=128).auc.mean()
    assert ours < chance
