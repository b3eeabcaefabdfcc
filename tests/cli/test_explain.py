"""The ``explain`` subcommand: torchvision model by name, optional weights, one overlay PNG per image."""
import re

import pytest
import torch

from torchex_fn.__main__ import main

from support.cli import usage_error, with_flags

Image = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")

SIZE = "64"


@pytest.fixture
def images(tmp_path):
    """Two small PNGs of different sizes (both are resized to --size)."""
    paths = []
    for i, (w, h) in enumerate([(40, 30), (80, 80)]):
        data = bytes((x * 7 + y * 3 + 90 * i + c * 50) % 256 for y in range(h) for x in range(w) for c in range(3))
        path = tmp_path / f"img{i}.png"
        Image.frombytes("RGB", (w, h), data).save(path)
        paths.append(str(path))
    return paths


def run(out, images, *extra):
    return main(["explain", "--model", "torchvision:resnet18", "--image", *images, "--size", SIZE,
                 "--out", str(out), "--threads", "2", *extra])


def pixels(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (int(SIZE), int(SIZE))
        return img.tobytes()


def test_grad_cam_writes_one_overlay_per_image_and_warns_without_weights(tmp_path, images, capsys):
    out = tmp_path / "maps"
    assert run(out, images, "--method", "grad_cam", "--layer", "layer4", "--target", "3") == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["img0_grad_cam.png", "img1_grad_cam.png"]
    for name in written:
        pixels(out / name)
    captured = capsys.readouterr()
    assert "untrained (randomly initialised)" in captured.err
    assert captured.out.count("wrote ") == 2 and "img1_grad_cam.png" in captured.out


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "cam"])
def test_other_methods_run(tmp_path, images, method):
    assert run(tmp_path, images[:1], "--method", method) == 0
    pixels(tmp_path / f"img0_{method}.png")


def test_rise_runs_with_a_few_masks(tmp_path, images):
    assert run(tmp_path, images[:1], "--method", "rise", "--rise-masks", "8") == 0
    pixels(tmp_path / "img0_rise.png")


def test_weights_change_the_map(tmp_path, images, capsys):
    maps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.pt"
        torch.save(torchvision.models.resnet18().state_dict(), path)
        out = tmp_path / f"out{seed}"
        assert run(out, images[:1], "--weights", str(path), "--target", "5") == 0
        maps.append(pixels(out / "img0_grad_cam.png"))
    assert "warning" not in capsys.readouterr().err
    assert maps[0] != maps[1]
    again = tmp_path / "again"
    assert run(again, images[:1], "--weights", str(tmp_path / "w1.pt"), "--target", "5") == 0
    assert pixels(again / "img0_grad_cam.png") == maps[0]  # deterministic


@pytest.mark.parametrize("extra, match", [
    (["--method", "gradcam"], "unknown method 'gradcam'; choose one of saliency, input_x_gradient"),
    (["--model", "torchvision:resnet19"], "unknown torchvision classifier 'resnet19'; did you mean"),
    (["--model", "keras:resnet18"], "expected 'torchvision:<name>' or 'timm:<name>'"),
    (["--model", "timm:resnet19x"], "unknown timm model 'resnet19x'"),
    (["--option", "steps"], "--option: expected KEY=VALUE"),
    (["--option", "stepz=3"], "--option: grad_cam has no option 'stepz'; its options are layer, "),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
    (["--image", "missing.png"], "--image: no such file 'missing.png'"),
    (["--weights", "nope.pt"], "--weights: no such file 'nope.pt'"),
    (["--layer", "layer9"], "grad_cam: unknown layer"),
    (["--target", "1000"], r"--target: expected a class index in \[0, 1000\), got 1000"),
    (["--size", "0"], "--size must be >= 1"),
])
def test_bad_arguments_exit_non_zero_with_a_message(tmp_path, images, capsys, extra, match):
    argv = ["explain", "--model", "torchvision:resnet18", "--image", images[0], "--size", SIZE,
            "--out", str(tmp_path)]
    usage_error(with_flags(argv, extra))
    assert re.search(match, capsys.readouterr().err)


def test_weights_that_do_not_fit_are_refused(tmp_path, images, capsys):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(SystemExit):
        run(tmp_path, images[:1], "--weights", str(path))
    assert "does not fit the model" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        run(tmp_path, images[:1], "--weights", str(junk))
    assert "could not read" in capsys.readouterr().err



# ------------------------------------------------------------------ folders, checkpoints, resume
def picture(path, seed, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", size, bytes(data.flatten().tolist())).save(path)
    return str(path)


def run_data(data, out, *extra):
    return main(["explain", "--model", "torchvision:resnet18", "--data", str(data), "--size", SIZE,
                 "--out", str(out), "--threads", "2", "--quiet", *extra])


def test_a_10_class_checkpoint_is_loaded_with_inferred_classes(tmp_path, images, capsys):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "ten.pt"
    torch.save({"state_dict": net.state_dict()}, path)  # a training checkpoint's layout
    assert run(tmp_path / "o", images, "--weights", str(path)) == 0
    captured = capsys.readouterr()
    assert "has a 10-class classifier: building torchvision:resnet18 with num_classes=10" in captured.err
    predicted = [int(m) for m in re.findall(r"predicted (\d+)", captured.out)]
    assert len(predicted) == 2 and all(0 <= p < 10 for p in predicted)
    with pytest.raises(SystemExit):  # an explicit, wrong --num-classes is not overridden
        run(tmp_path / "o2", images[:1], "--weights", str(path), "--num-classes", "5")
    assert "size mismatch for fc.weight" in capsys.readouterr().err


def test_a_10_class_checkpoint_through_data_and_its_predictions(tmp_path):
    torch.manual_seed(4)
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(net.state_dict(), tmp_path / "ten.pt")
    paths = [picture(tmp_path / "imgs" / f"{i}.png", i) for i in range(3)]
    assert run_data(tmp_path / "imgs", tmp_path / "store", "--weights", str(tmp_path / "ten.pt")) == 0
    import torchex_fn as tx
    from torchex_fn.cli.explain import _normalize, _read_image
    store = tx.open_attributions(tmp_path / "store")
    x = _normalize(torch.stack([_read_image(tmp_path / "imgs" / f"{i}.png", int(SIZE)) for i in range(3)]))
    with torch.no_grad():
        want = net(x).argmax(1)
    assert torch.equal(store.predictions, want) and torch.equal(store.targets, want)
    assert (tmp_path / "store" / "files.txt").read_text() == "0.png\n1.png\n2.png\n"
    assert len(paths) == len(store) == 3


def test_same_named_files_in_two_folders_give_two_outputs(tmp_path, capsys):
    a = picture(tmp_path / "data" / "a" / "cat.png", 1)
    b = picture(tmp_path / "data" / "b" / "cat.png", 2)
    assert run_data(tmp_path / "data", tmp_path / "store", "--overlays", str(tmp_path / "ov")) == 0
    written = sorted(str(p.relative_to(tmp_path / "ov")) for p in (tmp_path / "ov").rglob("*.png"))
    assert written == ["a/cat_grad_cam.png", "b/cat_grad_cam.png"]
    assert pixels(tmp_path / "ov" / "a" / "cat_grad_cam.png") != pixels(tmp_path / "ov" / "b" / "cat_grad_cam.png")
    assert "wrote 2 overlays" in capsys.readouterr().out
    assert run(tmp_path / "single", [a, b]) == 0  # --image keeps the paths too
    assert sorted(str(p.relative_to(tmp_path / "single")) for p in (tmp_path / "single").rglob("*.png")) == \
        ["a/cat_grad_cam.png", "b/cat_grad_cam.png"]
    # a glob, and the same store again: nothing to compute, same listing
    assert run_data(str(tmp_path / "data" / "*" / "cat.png"), tmp_path / "store") == 0
    other = picture(tmp_path / "more" / "dog.png", 5)
    with pytest.raises(SystemExit):
        run_data(other, tmp_path / "store")
    assert "holds the maps of other files" in capsys.readouterr().err


def test_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    from torchex_fn.composite.runner import codec
    for i in range(5):
        picture(tmp_path / "data" / f"{i}.png", 10 + i)
    extra = ("--method", "saliency", "--option", "abs=True", "--size", "32", "--batch-size", "2")
    write, calls = codec.write_atomic, []

    def dies_on_the_second_shard(path, t):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while batch 1 was being stored
        write(path, t)
    monkeypatch.setattr(codec, "write_atomic", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_data(tmp_path / "data", tmp_path / "store", *extra)
    monkeypatch.setattr(codec, "write_atomic", write)
    assert sorted(p.name for p in (tmp_path / "store" / "shards").glob("*.maps.npy")) == ["000000.maps.npy"]
    inode = (tmp_path / "store" / "shards" / "000000.maps.npy").stat().st_ino
    with pytest.raises(SystemExit):  # other options into the same store are refused
        run_data(tmp_path / "data", tmp_path / "store", *extra[:-2], "--batch-size", "3")
    assert run_data(tmp_path / "data", tmp_path / "store", *extra) == 0
    assert run_data(tmp_path / "data", tmp_path / "whole", *extra) == 0
    import torchex_fn as tx
    resumed, whole = tx.open_attributions(tmp_path / "store"), tx.open_attributions(tmp_path / "whole")
    assert resumed.map_shape == (3, 32, 32) and bool((resumed.maps[0:5] >= 0).all())  # abs=True reached saliency
    assert torch.equal(resumed.maps[0:5], whole.maps[0:5]) and torch.equal(resumed.indices, torch.arange(5))
    assert (tmp_path / "store" / "shards" / "000000.maps.npy").stat().st_ino == inode


def test_timm_models_are_accepted(tmp_path):
    pytest.importorskip("timm")
    img = picture(tmp_path / "x.png", 0)
    assert main(["explain", "--model", "timm:resnet10t", "--image", img, "--size", SIZE, "--out", str(tmp_path / "o"),
                 "--threads", "2", "--num-classes", "7", "--option", "relu=False"]) == 0
    pixels(tmp_path / "o" / "x_grad_cam.png")
