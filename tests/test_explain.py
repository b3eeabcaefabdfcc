"""The ``explain`` subcommand: torchvision model by name, optional weights, one overlay PNG per image."""
import re

import pytest
import torch

from torchex_fn.__main__ import main

Image = pytest.importorskip("PIL.Image")
torchvision = pytest.importorskip("torchvision")

SIZE = "64"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # explain sets its own thread count


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
    (["--model", "timm:resnet18"], "expected 'torchvision:<name>'"),
    (["--image", "missing.png"], "--image: no such file 'missing.png'"),
    (["--weights", "nope.pt"], "--weights: no such file 'nope.pt'"),
    (["--layer", "layer9"], "grad_cam: unknown layer"),
    (["--target", "1000"], r"--target: expected a class index in \[0, 1000\), got 1000"),
    (["--size", "0"], "--size must be >= 1"),
])
def test_bad_arguments_exit_non_zero_with_a_message(tmp_path, images, capsys, extra, match):
    argv = ["explain", "--model", "torchvision:resnet18", "--image", images[0], "--size", SIZE,
            "--out", str(tmp_path)]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
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

