"""``torchex-fn explain --task detection`` (issue 21): the maps written equal the library called by hand on the
detector built the same way, the overlays carry the explained box, and every mistake is one stderr line with
exit code 2.

The detector is torchvision's Faster R-CNN MobileNetV3-FPN at 96 px with random weights whose class layer is
drawn wider (std 0.05), saved as a state_dict and given with ``--weights``, so the boxes' scores and labels
differ.
"""
import re

import pytest
import torch

import torchex_fn as tx
from torchex_fn.__main__ import main
from torchex_fn.cli.explain import _read_image

from support.cli import usage_error, with_flags

Image = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")

SIZE = 96
NAME = "fasterrcnn_mobilenet_v3_large_fpn"
MAGENTA = (255, 0, 255)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 96 x 80 picture (resized to 96 x 96 by --size) and the detector's weights."""
    folder = tmp_path_factory.mktemp("detection")
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 256, (80, 96, 3), generator=g, dtype=torch.uint8)
    image = folder / "street.png"
    Image.frombytes("RGB", (96, 80), bytes(data.flatten().tolist())).save(image)
    torch.manual_seed(0)
    model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None)
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.05)
    weights = folder / "detector.pt"
    torch.save(model.state_dict(), weights)
    return image, weights


def reference(files):
    """The detector as the command line builds it with --score-threshold 0 at --size 96, and the image."""
    image, weights = files
    model = torchvision.models.get_model(NAME, weights=None, weights_backbone=None).eval()
    model.load_state_dict(torch.load(weights))
    model.transform.min_size, model.transform.max_size = (SIZE,), SIZE
    model.roi_heads.score_thresh = 0.0
    return model, _read_image(image, SIZE)[None]


def explain(files, out, method, *extra):
    image, weights = files
    code = main(["explain", "--task", "detection", "--model", f"torchvision:{NAME}", "--weights", str(weights),
                 "--image", str(image), "--size", str(SIZE), "--score-threshold", "0", "--out", str(out),
                 "--method", method, "--threads", "1", *extra])
    assert code == 0
    return torch.load(out / f"street_{method}.pt")


def close(got, want):
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (SIZE, SIZE)
        return torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3)


def box_edge(box, width=2):
    """The pixels of a box's outline, written out one by one: ``width`` pixels inside the rounded box."""
    x1, y1, x2, y2 = (min(max(int(round(float(v))), 0), SIZE - 1) for v in box)
    edge = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    for y in range(y1, y2 + 1):
        for x in range(x1, x2 + 1):
            if x - x1 < width or x2 - x < width or y - y1 < width or y2 - y < width:
                edge[y, x] = True
    return edge


def test_grad_cam_maps_equal_the_library_and_the_overlays_carry_the_boxes(files, tmp_path, capsys):
    written = explain(files, tmp_path, "grad_cam", "--max-boxes", "2")
    model, x = reference(files)
    with torch.no_grad():
        found = model(x)[0]
    assert found["scores"][0] >= found["scores"][1] > 0          # the detector sorts its boxes by score
    torch.testing.assert_close(written["boxes"], found["boxes"][:2])
    assert torch.equal(written["labels"], found["labels"][:2]) and torch.equal(written["index"], torch.arange(2))
    fn, params = tx.functionalize(model)
    want = torch.cat([tx.grad_cam(fn, params, x, tx.targets.box_score(found["boxes"][k:k + 1],
                                                                      found["labels"][k:k + 1]),
                                  layer="backbone.body.16") for k in range(2)])
    assert written["maps"].shape == (2, 1, SIZE, SIZE)
    close(written["maps"], want)
    scaled = want / want.amax((1, 2, 3), keepdim=True)               # a random backbone's maps are ~1e-12
    assert (scaled[0] - scaled[1]).abs().max() > 0.1                 # two boxes, two different maps
    for k in range(2):
        pixels = png(tmp_path / f"street_grad_cam_box{k}.png")
        plain = tx.viz.to_uint8(tx.viz.overlay(x, written["maps"][k:k + 1], cmap="jet", alpha=0.5)[0])
        edge = box_edge(found["boxes"][k])
        assert 50 < int(edge.sum()) < SIZE * SIZE // 2
        assert (pixels[edge] == torch.tensor(MAGENTA, dtype=torch.uint8)).all()
        assert torch.equal(pixels[~edge], plain[~edge])              # nothing but the box is drawn
        assert (plain[edge] != pixels[edge]).any()
    out = capsys.readouterr().out
    assert out.count("wrote ") == 3 and "street_grad_cam_box1.png (grad_cam, box 1: " in out


def test_box_index_explains_that_box_alone(files, tmp_path):
    written = explain(files, tmp_path, "saliency", "--box-index", "1")
    model, x = reference(files)
    with torch.no_grad():
        found = model(x)[0]
    torch.testing.assert_close(written["boxes"], found["boxes"][1:2])
    assert torch.equal(written["index"], torch.tensor([1]))
    fn, params = tx.functionalize(model)
    close(written["maps"], tx.saliency(fn, params, x, tx.targets.box_score(found["boxes"][1:2],
                                                                          found["labels"][1:2])))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["street_saliency_box0.png"]


def test_drise_maps_equal_the_library(files, tmp_path):
    written = explain(files, tmp_path, "drise", "--max-boxes", "3", "--rise-masks", "8",
                      "--option", "cell_size=8", "--seed", "4")
    model, x = reference(files)
    with torch.no_grad():
        found = model(x)[0]
    fn, params = tx.functionalize(model)
    want = tx.drise(fn, params, x, found["boxes"][:3], found["labels"][:3], num_masks=8, cell_size=8,
                    generator=torch.Generator().manual_seed(4))
    assert written["maps"].shape == (3, 1, SIZE, SIZE)
    close(written["maps"], want[0][:, None])
    for k in range(3):
        png(tmp_path / f"street_drise_box{k}.png")


DETECTOR = ["explain", "--task", "detection", "--model", f"torchvision:{NAME}", "--size", str(SIZE),
            "--score-threshold", "0", "--threads", "1"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "detect"], r"argument --task: invalid choice: 'detect' \(choose from '?classification'?, "
                           r"'?detection'?, '?segmentation'?\)"),
    (["--model", "torchvision:resnet18"], r"--model: --task detection expected a torchvision detector "
                                          r"\(fasterrcnn_mobilenet_v3_large_320_fpn, .*\), got torchvision:resnet18, "
                                          r"a classifier \(use --task classification\)"),
    (["--model", "torchvision:fasterrcnn_resnet5"], r"--model: unknown torchvision detector 'fasterrcnn_resnet5'; "
                                                    r"did you mean fasterrcnn_resnet50_fpn"),
    (["--model", "timm:resnet18"], r"--model: --task detection expected 'torchvision:<detector>'"),
    (["--category", "person"], r"--category: only with --task segmentation, got --task detection"),
    (["--score-threshold", "1.5"], r"--score-threshold: expected a number in \[0, 1\), got 1.5"),
    (["--box-index", "-1"], r"--box-index: expected an index >= 0"),
    (["--max-boxes", "0"], r"--max-boxes must be >= 1"),
    (["--target", "3"], r"--target: with --task detection the target is the boxes above --score-threshold"),
    (["--data", "imgs/"], r"--data: --task detection explains --image files"),
    (["--method", "drise", "--layer", "backbone"], r"--layer: drise takes no such option"),
    (["--method", "drise", "--option", "steps=3"], r"--option: drise has no option 'steps'; its options are "
                                                   r"cell_size, probability, batch_size, box_format"),
    (["--option", "steps=3"], r"--option: grad_cam has no option 'steps'"),
    # after the detector's forward, before any explanation
    (["--score-threshold", "0.9"], r"--score-threshold: expected a detection scoring above 0.9 in .*street.png, "
                                   r"got none; lower --score-threshold"),
    (["--box-index", "500"], r"--box-index: expected an index below \d+ \(the boxes above --score-threshold 0.0 "
                             r"in .*street.png\), got 500"),
    (["--layer", "backbone.body.99"], r"grad_cam: unknown layer 'backbone.body.99'"),
])
def test_mistakes_are_one_line_with_exit_code_2(files, tmp_path, capsys, extra, message):
    argv = with_flags(DETECTOR + ["--image", str(files[0]), "--out", str(tmp_path)], extra)
    usage_error(argv)
    err = capsys.readouterr().err
    assert err.startswith("torchex-fn: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.png"))


def test_weights_of_another_class_count_ask_for_num_classes(files, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "three.pt"
    torch.save(torchvision.models.get_model(NAME, weights=None, weights_backbone=None, num_classes=3).state_dict(),
               path)
    argv = DETECTOR + ["--image", str(files[0]), "--out", str(tmp_path), "--weights", str(path)]
    usage_error(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"--weights: '.*three.pt' does not fit torchvision:fasterrcnn_mobilenet"
                                              r"_v3_large_fpn: .*size mismatch.*; a checkpoint with another number "
                                              r"of classes needs it given: --num-classes N", err), err
    assert main(argv + ["--num-classes", "3", "--max-boxes", "1", "--method", "saliency"]) == 0
    assert torch.load(tmp_path / "street_saliency.pt")["labels"].max() < 3


@pytest.mark.parametrize("argv, message", [
    (["explain", "--model", f"torchvision:{NAME}", "--image", "x.png"],
     r"unknown torchvision classifier 'fasterrcnn_mobilenet_v3_large_fpn'; it is a detector: add --task detection"),
    (["explain", "--model", "torchvision:resnet18", "--image", "x.png", "--score-threshold", "0.5"],
     r"--score-threshold: only with --task detection, got --task classification"),
    (["explain", "--model", "torchvision:resnet18", "--image", "x.png", "--method", "drise"],
     r"--method: drise explains detections: expected --task detection, got --task classification"),
    (["explain", "--task", "detection", "--model", "torchvision:ssd300_vgg16", "--image", "x.png", "--size", "96"],
     r"--size 96 does not fit torchvision:ssd300_vgg16 \(.*\); try a larger --size \(e.g. 320\)"),
    (["explain", "--task", "segmentation", "--model", "torchvision:lraspp_mobilenet_v3_large", "--image", "x.png",
      "--method", "drise"], r"--method: drise explains detections: expected --task detection, got --task segmentation"),
])
def test_more_mistakes(files, capsys, argv, message):
    usage_error(with_flags(argv, ["--image", str(files[0])]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
