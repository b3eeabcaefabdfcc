"""A researcher's first day with ``torchex-fn explain`` (issue 22, item 5): timm and torchvision transformers run
with their family's defaults at a small --size, the feature methods get --features, and every mistake is one line
on stderr with exit code 2.

The maps are read back from the store of ``--data`` and compared with the library called by hand on the same
model (built the way the command line builds it: random init under seed 0, set to the size where timm can).
"""
import re
import warnings

import pytest
import torch

import torchex_fn as tx
from torchex_fn.__main__ import main
from torchex_fn.cli import explain
from torchex_fn.cli.explain import _normalize, _read_image

from support.cli import usage_error, with_flags

Image = pytest.importorskip("PIL.Image")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZE = 64


def picture(path, seed, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", size, bytes(data.flatten().tolist())).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    for i in range(2):
        picture(tmp_path / "imgs" / f"{i}.png", i)
    return tmp_path / "imgs"


def images(folder):
    return _normalize(torch.stack([_read_image(folder / f"{i}.png", SIZE) for i in range(2)]))


def built(spec):
    """The model as the command line builds it: random init under seed 0, at SIZE where timm can set it."""
    source, _, name = spec.partition(":")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if source == "timm":
            model = timm.create_model(name, pretrained=False).eval()
            if hasattr(model, "set_input_size"):
                with warnings.catch_warnings():  # timm's resampling warns about its own indexing
                    warnings.simplefilter("ignore")
                    model.set_input_size(img_size=SIZE)
        else:
            model = torchvision.models.get_model(name, weights=None).eval()
    return tx.functionalize(model)


def explain_data(folder, out, model, *extra):
    code = main(["explain", "--model", model, "--data", str(folder), "--size", str(SIZE), "--out", str(out),
                 "--threads", "1", "--quiet", *extra])
    assert code == 0
    return tx.open_attributions(out)


TOKENS_1 = tx.postprocess.tokens_to_grid(1)
TOKENS_2 = tx.postprocess.tokens_to_grid(2)
LAST = tx.postprocess.channels_last_to_first


@pytest.mark.parametrize("model, layer, reshape", [
    ("timm:vit_tiny_patch16_224", "blocks.11.norm1", TOKENS_1),              # class token: tokens:1
    ("timm:deit_tiny_distilled_patch16_224", "blocks.11.norm1", TOKENS_2),   # class + distillation: tokens:2
    ("timm:swin_tiny_patch4_window7_224", "layers.3", LAST),                 # [B, 2, 2, 768] at 64: channels last
    ("timm:convnext_atto", "stages.3", None),                                # [B, 320, 2, 2] as it is
])
def test_a_transformer_at_size_64_runs_with_its_familys_layer_and_layout(tmp_path, folder, capsys, model, layer,
                                                                         reshape):
    store = explain_data(folder, tmp_path / "store", model)
    fn, params = built(model)
    x = images(folder)
    options = {} if reshape is None else {"reshape": reshape}
    want = tx.grad_cam(fn, params, x, None, layer=layer, **options)
    assert store.map_shape == (1, SIZE, SIZE)
    assert float(want.abs().max()) > 0  # a map with something in it, not two zero maps that agree
    torch.testing.assert_close(store.maps[0:2], want, rtol=1e-5, atol=1e-6)
    assert "untrained (randomly initialised)" in capsys.readouterr().err  # the warning comes after the work


def test_the_flags_override_the_defaults(tmp_path, folder):
    store = explain_data(folder, tmp_path / "a", "timm:vit_tiny_patch16_224", "--layer", "blocks.10.norm1",
                         "--reshape", "tokens:1", "--method", "layer_cam")
    fn, params = built("timm:vit_tiny_patch16_224")
    want = tx.layer_cam(fn, params, images(folder), None, layer="blocks.10.norm1", reshape=TOKENS_1)
    torch.testing.assert_close(store.maps[0:2], want, rtol=1e-5, atol=1e-6)


def test_torchvision_swin_reads_its_features_channels_last(tmp_path, folder):
    store = explain_data(folder, tmp_path / "store", "torchvision:swin_t", "--method", "hires_cam")
    fn, params = built("torchvision:swin_t")
    want = tx.hires_cam(fn, params, images(folder), None, layer="features", reshape=LAST)
    torch.testing.assert_close(store.maps[0:2], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, features, mask", [
    ("kernel_shap", "grid:16", lambda x: tx.masks.grid((SIZE, SIZE), 16)),
    ("lime", "superpixels:8", lambda x: tx.masks.superpixels(x, 8)),
    ("feature_ablation", "grid:32", lambda x: tx.masks.grid((SIZE, SIZE), 32)),
])
def test_feature_methods_take_a_mask_from_features(tmp_path, folder, method, features, mask):
    model = "timm:vit_tiny_patch16_224"
    seeded = method != "feature_ablation"
    extra = ("--option", "samples=24") if seeded else ()
    store = explain_data(folder, tmp_path / "store", model, "--method", method, "--features", features, *extra)
    fn, params = built(model)
    x = images(folder)
    function = getattr(tx, method)
    if seeded:  # the same call through attribute_dataset (one batch), which seeds each batch from --seed's generator
        data = torch.utils.data.TensorDataset(x, torch.full((2,), -1))
        want = tx.attribute_dataset(function, fn, params, data, out=tmp_path / "want", batch_size=32, progress=False,
                                    feature_mask=mask(x), samples=24, generator=torch.Generator().manual_seed(0)).maps[0:2]
    else:
        want = function(fn, params, x, None, feature_mask=mask(x))
    assert float(want.abs().max()) > 0
    assert int(mask(x).max()) + 1 == {"grid:16": 16, "superpixels:8": 9, "grid:32": 4}[features]  # 3 x 3 centres for 8
    torch.testing.assert_close(store.maps[0:2], want, rtol=1e-5, atol=1e-6)


def test_a_size_the_model_cannot_take_is_one_line_that_says_which_sizes_work(tmp_path, folder, capsys):
    with pytest.raises(SystemExit) as err:
        explain_data(folder, tmp_path / "store", "timm:vit_tiny_patch16_224", "--size", "8")
    assert err.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("torchex-fn: error: --size 8 does not fit timm:vit_tiny_patch16_224 (")
    assert lines[0].endswith("sizes that work: 16, 32, 224")


MISTAKES = [
    (["--model", "timm:vit_tiny_patchx"], "--model: unknown timm model 'vit_tiny_patchx'; did you mean"),
    (["--model", "torchvision:resnet19"], "unknown torchvision classifier 'resnet19'"),
    (["--layer", "blocks.99"], "grad_cam: unknown layer 'blocks.99'"),
    (["--size", "8"], "--size 8 does not fit"),
    (["--size", "0"], "--size must be >= 1"),
    (["--method", "integrated_gradients", "--option", "steps=-1"], "integrated_gradients: expected steps >= 1"),
    (["--method", "integrated_gradients", "--option", "steps=abc"], "expected steps, a positive int, got str"),
    (["--option", "reshape=tokens"], "--option: reshape= takes a Python object, which --option cannot give; use "
                                     "--reshape"),
    (["--reshape", "tokenz"], "--reshape: expected tokens, tokens:N"),
    (["--reshape", "none"], r"Pass reshape=.*\(from the command line: --reshape tokens\[:N\]"),
    (["--features", "grid:8"], "--features: grad_cam takes no feature_mask="),
    (["--method", "lime", "--features", "grid:0"], "--features: expected grid:N"),
    (["--method", "kernel_shap"], r"feature_mask=.*\(from the command line: --features grid:N / superpixels:N\)"),
    (["--image", "missing.png"], "--image: no such file 'missing.png'"),
    (["--weights", "missing.pt"], "--weights: no such file 'missing.pt'"),
    (["--target", "1000"], r"--target: expected a class index in \[0, 1000\), got 1000"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("extra, match", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_every_mistake_is_one_line_and_exit_code_2(tmp_path, capsys, extra, match):
    image = str(picture(tmp_path / "a.png", 0))
    argv = ["explain", "--model", "timm:vit_tiny_patch16_224", "--image", image, "--size", str(SIZE),
            "--out", str(tmp_path / "out"), "--threads", "1"]
    usage_error(with_flags(argv, extra))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("torchex-fn: error: ")
    assert re.search(match, lines[0]), lines[0]


def test_the_packages_value_and_type_errors_end_at_the_top_in_one_line_other_errors_stay_tracebacks(
        monkeypatch, capsys):
    def raises(error):
        def run(args):
            raise error
        return run

    argv = ["explain", "--model", "timm:vit_tiny_patch16_224", "--image", "a.png"]
    for error in (ValueError("grad_cam: expected a thing,\n  got another."), TypeError("lrp: expected a tensor")):
        monkeypatch.setattr(explain, "run", raises(error))
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        assert capsys.readouterr().err == f"torchex-fn: error: {' '.join(str(error).split())}\n"
    monkeypatch.setattr(explain, "run", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)
