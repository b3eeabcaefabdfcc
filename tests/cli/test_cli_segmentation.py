"""``torchex-fn explain --task segmentation`` (issue 21): the maps written equal the library called by hand on the
segmenter built the same way (torchvision's DeepLabV3-MobileNetV3, random weights under --seed 0, 96 px), the
region is the one asked for, its outline is drawn on the overlay, and every mistake is one stderr line with exit
code 2."""
import re

import pytest
import torch

import torchex_fn as tx
from torchex_fn.__main__ import main
from torchex_fn.cli import tasks
from torchex_fn.cli.explain import _normalize, _read_image

from support.cli import usage_error, with_flags

Image = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")

SIZE = 96
NAME = "deeplabv3_mobilenet_v3_large"
MAGENTA = (255, 0, 255)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two pictures in two folders with the same file name (their outputs keep the folders apart)."""
    folder = tmp_path_factory.mktemp("segmentation")
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        data = torch.randint(0, 256, (64, 72, 3), generator=g, dtype=torch.uint8)
        (folder / f"d{i}").mkdir()
        paths.append(folder / f"d{i}" / "scene.png")
        Image.frombytes("RGB", (72, 64), bytes(data.flatten().tolist())).save(paths[-1])
    return folder, paths


@pytest.fixture(scope="module")
def reference(pictures):
    """The segmenter as the command line builds it (seed 0, no pretrained backbone), and the normalised images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None).eval()
    images = torch.stack([_read_image(p, SIZE) for p in pictures[1]])
    return model, images


def explain(pictures, out, *extra):
    code = main(["explain", "--task", "segmentation", "--model", f"torchvision:{NAME}", "--image",
                 *[str(p) for p in pictures[1]], "--size", str(SIZE), "--out", str(out), "--threads", "1", *extra])
    assert code == 0
    return [torch.load(out / f"d{i}" / "scene_grad_cam.pt") for i in range(2)]


def close(got, want):
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (SIZE, SIZE)
        return torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3)


def test_default_category_and_region_are_the_prediction_and_the_maps_equal_the_library(pictures, reference,
                                                                                         tmp_path, capsys):
    written = explain(pictures, tmp_path)
    model, images = reference
    x = _normalize(images)
    with torch.no_grad():
        predicted = model(x)["out"].argmax(1)                        # [2, 96, 96]
    categories = [int(torch.bincount(p.flatten(), minlength=21).argmax()) for p in predicted]
    masks = torch.stack([predicted[b] == categories[b] for b in range(2)])
    fn, params = tx.functionalize(model)
    want = tx.grad_cam(fn, params, x, tx.targets.segmentation(torch.tensor(categories), masks), layer="backbone.16")
    for b in range(2):
        assert written[b]["category"] == categories[b]
        assert torch.equal(written[b]["mask"], masks[b])
        close(written[b]["maps"], want[b:b + 1])
    assert capsys.readouterr().out.count("wrote ") == 2


def test_a_named_category_over_a_box_and_its_outline(pictures, reference, tmp_path):
    written = explain(pictures, tmp_path, "--category", "Person", "--region", "20,30,70,81")
    model, images = reference
    x = _normalize(images)
    box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    box[30:81, 20:70] = True                                          # x in [20, 70), y in [30, 81)
    fn, params = tx.functionalize(model)
    want = tx.grad_cam(fn, params, x, tx.targets.segmentation(15, box), layer="backbone.16")  # VOC's person: 15
    edge = torch.zeros(SIZE, SIZE, dtype=torch.bool)                  # the box's outermost pixels
    edge[30, 20:70] = edge[80, 20:70] = edge[30:81, 20] = edge[30:81, 69] = True
    for b in range(2):
        assert written[b]["category"] == 15 and torch.equal(written[b]["mask"], box)
        close(written[b]["maps"], want[b:b + 1])
        pixels = png(tmp_path / f"d{b}" / "scene_grad_cam.png")
        plain = tx.viz.to_uint8(tx.viz.overlay(images[b:b + 1], written[b]["maps"], cmap="jet", alpha=0.5)[0])
        assert (pixels[edge] == torch.tensor(MAGENTA, dtype=torch.uint8)).all()
        assert torch.equal(pixels[~edge], plain[~edge])
        assert (plain[edge] != pixels[edge]).any()


def test_a_gradient_method_and_region_all(pictures, reference, tmp_path):
    dotted = tmp_path / "in" / "scene.v2.png"                         # a name with a dot keeps it
    dotted.parent.mkdir()
    dotted.write_bytes(pictures[1][0].read_bytes())
    code = main(["explain", "--task", "segmentation", "--model", f"torchvision:{NAME}", "--image",
                 str(dotted), "--size", str(SIZE), "--out", str(tmp_path), "--threads", "1",
                 "--method", "saliency", "--category", "3", "--region", "all"])
    assert code == 0
    written = torch.load(tmp_path / "scene.v2_saliency.pt")
    model, images = reference
    fn, params = tx.functionalize(model)
    x = _normalize(images[:1])
    close(written["maps"], tx.saliency(fn, params, x, tx.targets.segmentation(3, torch.ones(SIZE, SIZE))))
    assert written["mask"].all()
    png(tmp_path / "scene.v2_saliency.png")


SEGMENTER = ["explain", "--task", "segmentation", "--model", f"torchvision:{NAME}", "--size", str(SIZE),
             "--threads", "1"]


@pytest.mark.parametrize("extra, message", [
    (["--category", "21"], r"--category: expected a category index in \[0, 21\), got 21"),
    (["--category", "persn"], r"--category: expected a category index in \[0, 21\) or a name \(__background__, "
                              r"aeroplane, .*\), got 'persn'; did you mean person\?"),
    (["--region", "0,0,200,10"], r"--region: expected predicted, all, or a box X1,Y1,X2,Y2 with 0 <= x1 < x2 <= 96 "
                                 r"and 0 <= y1 < y2 <= 96 \(pixels of the --size image\), got '0,0,200,10'"),
    (["--region", "middle"], r"--region: expected predicted, all, or a box"),
    (["--model", "torchvision:fasterrcnn_mobilenet_v3_large_fpn"],
     r"--model: --task segmentation expected a torchvision segmenter \(.*\), got "
     r"torchvision:fasterrcnn_mobilenet_v3_large_fpn, a detector \(use --task detection\)"),
    (["--model", "torchvision:deeplab"], r"--model: unknown torchvision segmenter 'deeplab'"),
    (["--score-threshold", "0.3"], r"--score-threshold: only with --task detection, got --task segmentation"),
    (["--box-index", "0"], r"--box-index: only with --task detection, got --task segmentation"),
    (["--target", "3"], r"--target: with --task segmentation the target is --category, not a class index"),
    # after the model's forward: a random model predicts one category everywhere, so others cover no pixel
    (["--category", "cat"], r"--category: no pixel of .*scene.png is predicted as cat \(8\); expected a category "
                            r"the model predicts there, or --region all / X1,Y1,X2,Y2"),
    (["--layer", "backbone.99"], r"grad_cam: unknown layer 'backbone.99'"),
])
def test_mistakes_are_one_line_with_exit_code_2(pictures, tmp_path, capsys, extra, message):
    usage_error(with_flags(SEGMENTER + ["--image", str(pictures[1][0]), "--out", str(tmp_path)], extra))
    err = capsys.readouterr().err
    assert err.startswith("torchex-fn: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not list(tmp_path.rglob("*.png"))


def test_category_outside_segmentation(pictures, capsys):
    usage_error(["explain", "--model", "torchvision:resnet18", "--image", str(pictures[1][0]), "--category", "3"])
    assert "--category: only with --task segmentation, got --task classification" in capsys.readouterr().err
    usage_error(["explain", "--model", "torchvision:deeplabv3_resnet50", "--image", str(pictures[1][0])])
    assert "unknown torchvision classifier 'deeplabv3_resnet50'; it is a segmenter: add --task segmentation" \
        in capsys.readouterr().err


@pytest.mark.parametrize("name, layer", [
    ("deeplabv3_mobilenet_v3_large", "backbone.16"), ("deeplabv3_resnet50", "backbone.layer4"),
    ("fcn_resnet50", "backbone.layer4"), ("lraspp_mobilenet_v3_large", "backbone.16"),
    ("fasterrcnn_mobilenet_v3_large_fpn", "backbone.body.16"), ("fasterrcnn_resnet50_fpn", "backbone.body.layer4"),
    ("retinanet_resnet50_fpn", "backbone.body.layer4"), ("fcos_resnet50_fpn", "backbone.body.layer4"),
    ("maskrcnn_resnet50_fpn", "backbone.body.layer4"), ("ssd300_vgg16", "backbone.features"),
    ("ssdlite320_mobilenet_v3_large", "backbone.features.1"),
])
def test_default_layers_are_the_backbones_last_stage(name, layer):
    with torch.device("meta"):                                        # the modules' names, without their weights
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    assert tasks.default_layer(model) == layer
    assert layer in dict(model.named_modules())
