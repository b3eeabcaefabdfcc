"""attribute_dataset / open_attributions: the same maps as the method on each batch, resumable after
SIGKILL at several points, refusal of mixed runs, and two gloo processes equal to one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchex_fn as tx
from torchex_fn.composite import runner as ds

ROOT = Path(__file__).resolve().parents[2]

# The model and data, as source, so that subprocesses (SIGKILL, torchrun) build the very same ones.
SETUP = textwrap.dedent('''
    import torch
    import torchex_fn as tx

    def tiny_model():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = torch.nn.Sequential()
            net.add_module("conv", torch.nn.Conv2d(3, 8, 3, padding=1))
            net.add_module("relu", torch.nn.ReLU())
            net.add_module("features", torch.nn.Conv2d(8, 8, 3, padding=1))
            net.add_module("relu2", torch.nn.ReLU())
            net.add_module("pool", torch.nn.AdaptiveAvgPool2d(1))
            net.add_module("flat", torch.nn.Flatten())
            net.add_module("fc", torch.nn.Linear(8, 5))
        return net.eval()

    class Images(torch.utils.data.Dataset):
        """Example i is drawn from a generator seeded with i: the same on every process, never all in memory."""
        def __init__(self, n, size=16, unlabeled=()):
            self.n, self.size, self.unlabeled = n, size, set(unlabeled)
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(1000 + i)
            return torch.randn(3, self.size, self.size, generator=g), -1 if i in self.unlabeled else i % 5
''')
exec(SETUP)  # defines tiny_model, Images


pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, data, **kw):
    fn, params = tx.functionalize(tiny_model())
    options = dict(method=tx.grad_cam, batch_size=4, layer="features", progress=False)
    options.update(kw)
    if options["layer"] is None:  # methods without layers
        del options["layer"]
    return tx.attribute_dataset(options.pop("method"), fn, params, data, out=out, **options)


def per_batch(data, batch_size, method=tx.grad_cam, **options):
    """The method called directly on the same batches (the reference)."""
    fn, params = tx.functionalize(tiny_model())
    maps, preds = [], []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.stack([a for a, _ in items])
        t = torch.tensor([b for _, b in items])
        with torch.no_grad():
            pred = fn(params, x).argmax(1)
        maps.append(method(fn, params, x, torch.where(t < 0, pred, t), **options))
        preds.append(pred)
    return torch.cat(maps), torch.cat(preds)


def test_maps_indices_targets_and_predictions_equal_the_method_on_each_batch(tmp_path):
    data = Images(10)
    store = run(tmp_path / "s", data)
    want, pred = per_batch(data, 4, layer="features")
    assert len(store) == 10 and store.map_shape == (1, 16, 16) and store.dtype == torch.float32
    assert torch.equal(store.maps[0:10], want)  # bit-identical: the same function on the same batches
    assert all(torch.equal(store.maps[i], want[i]) for i in (0, 3, 4, 9, -1))
    assert torch.equal(store.maps[3:6], want[3:6]) and torch.equal(store.maps[::3], want[::3])
    assert torch.equal(torch.stack(list(store.maps)), want)
    assert torch.equal(store.indices, torch.arange(10))
    assert torch.equal(store.targets, torch.arange(10) % 5)
    assert torch.equal(store.predictions, pred)
    again = tx.open_attributions(tmp_path / "s")
    assert torch.equal(again.maps[7], want[7]) and torch.equal(again.predictions, pred)
    with pytest.raises(IndexError, match="Attributions.maps: expected an index in"):
        again.maps[10]


def test_shards_open_with_numpy_and_float16_storage(tmp_path):
    np = pytest.importorskip("numpy")
    data = Images(6)
    store = run(tmp_path / "h", data, dtype=torch.float16)
    want, _ = per_batch(data, 4, layer="features")
    assert store.dtype == torch.float16 and torch.equal(store.maps[0:6], want.half())
    index = json.loads((tmp_path / "h" / "index.json").read_text())
    first = np.load(tmp_path / "h" / index["shards"][1]["maps"], mmap_mode="r")
    assert first.dtype == np.float16 and first.shape == (2, 1, 16, 16)
    assert torch.equal(torch.from_numpy(np.array(first)), want[4:6].half())
    meta = np.load(tmp_path / "h" / index["shards"][0]["meta"])
    assert meta.dtype == np.int64 and meta[:, 0].tolist() == [0, 1, 2, 3]


def test_predicted_class_for_unlabeled_examples(tmp_path):
    # all unlabeled: the method's own forward gives the predictions; mixed: one extra forward
    for unlabeled, name in ((range(8), "all"), ((1, 2, 6), "mixed")):
        data = Images(8, unlabeled=unlabeled)
        store = run(tmp_path / name, data)
        want, pred = per_batch(data, 4, layer="features")
        assert torch.equal(store.maps[0:8], want)
        labels = torch.tensor([data[i][1] for i in range(8)])
        assert torch.equal(store.targets, torch.where(labels < 0, pred, labels))
        assert torch.equal(store.predictions, pred)


def test_input_space_method_and_a_dataloader(tmp_path):
    data = Images(7)
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)  # batch size and order are ignored
    store = run(tmp_path / "s", loader, method=tx.saliency, batch_size=4, layer=None, num_workers=1)
    want, pred = per_batch(data, 4, method=tx.saliency)
    assert store.map_shape == (3, 16, 16) and torch.equal(store.maps[0:7], want)
    assert torch.equal(store.predictions, pred)  # taken from saliency's own forward pass


def test_generator_options_are_reseeded_per_batch_so_a_resumed_run_is_identical(tmp_path):
    data = Images(9)
    opts = dict(method=tx.rise, layer=None, batch_size=3, num_masks=16, cell_size=4)
    full = run(tmp_path / "full", data, generator=torch.Generator().manual_seed(7), **opts)
    part = tmp_path / "part"
    run(part, data, generator=torch.Generator().manual_seed(7), **opts)
    kept = (part / "shards" / "000000.maps.npy").stat().st_ino
    (part / "shards" / "000001.maps.npy").unlink()  # as if the run had died before batch 1 was stored
    (part / "index.json").unlink()
    with pytest.raises(ValueError, match="interrupted run"):
        tx.open_attributions(part)
    again = run(part, data, generator=torch.Generator().manual_seed(7), **opts)
    assert torch.equal(again.maps[0:9], full.maps[0:9])
    assert (part / "shards" / "000000.maps.npy").stat().st_ino == kept  # a stored shard is never rewritten
    other = run(tmp_path / "seed8", data, generator=torch.Generator().manual_seed(8), **opts)
    assert not torch.equal(other.maps[0:9], full.maps[0:9])


class Broken(Images):
    def __getitem__(self, i):
        if i == 5:
            raise ValueError("unreadable example 5")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_example_stops_the_run_with_its_error_and_keeps_the_stored_batches(tmp_path, workers):
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="unreadable example 5"):
        run(out, Broken(10), num_workers=workers)
    assert (out / "shards" / "000000.maps.npy").exists() and not (out / "index.json").exists()
    with pytest.raises(ValueError, match="interrupted run"):
        tx.open_attributions(out)


def test_a_truncated_shard_is_computed_again(tmp_path):
    # a file under its final name is whole unless the disk lost it (power cut): its length is checked
    out = tmp_path / "s"
    want = run(out, Images(8)).maps[0:8]
    shard = out / "shards" / "000001.maps.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    (out / "index.json").unlink()
    assert torch.equal(run(out, Images(8)).maps[0:8], want)
    assert len(shard.read_bytes()) > 200


def test_a_rerun_with_other_arguments_is_refused_never_mixed(tmp_path):
    out = tmp_path / "s"
    run(out, Images(8))
    changes = [
        (dict(batch_size=2), r"batch_size \(4 then, 2 now\)"),
        (dict(relu=False), "options"),
        (dict(layer="conv"), "options"),
        (dict(dtype=torch.float16), r"dtype \(None then, 'torch.float16' now\)"),
        (dict(method=tx.grad_cam_pp), "method"),
    ]
    for change, match in changes:
        with pytest.raises(ValueError, match="attribute_dataset: expected the same arguments as the run.*" + match):
            run(out, Images(8), **change)
    with pytest.raises(ValueError, match=r"data length \(8 then, 9 now\)"):
        run(out, Images(9))
    fn, params = tx.functionalize(tiny_model())
    params = {k: v + 1 if k == "fc.bias" else v for k, v in params.items()}
    with pytest.raises(ValueError, match="got different params"):
        tx.attribute_dataset(tx.grad_cam, fn, params, Images(8), out=out, batch_size=4, layer="features",
                             progress=False)
    assert torch.equal(tx.open_attributions(out).maps[0:8], per_batch(Images(8), 4, layer="features")[0])


def test_bad_arguments(tmp_path):
    data = Images(4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [
        (dict(batch_size=0), ValueError, "attribute_dataset: expected batch_size"),
        (dict(dtype=torch.bfloat16), ValueError, "dtype: None, torch.float16.*bfloat16"),
        (dict(num_workers=-1), ValueError, "num_workers"),
        (dict(target=3), TypeError, "target= option"),
        (dict(out=tmp_path / "other"), ValueError, "holds other files and no manifest.json"),
    ]
    for change, error, match in cases:
        kw = dict(out=tmp_path / "x")
        kw.update(change)
        with pytest.raises(error, match=match):
            run(kw.pop("out"), data, **kw)
    with pytest.raises(TypeError, match="map-style Dataset"):
        run(tmp_path / "y", iter([]))
    with pytest.raises(TypeError, match="one tensor of shape"):
        run(tmp_path / "z", data, layer=["features", "conv"])
    with pytest.raises(ValueError, match="open_attributions: expected a folder written by attribute_dataset"):
        tx.open_attributions(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.cuda
def test_cuda_params_pinned_copies_and_the_same_maps_as_the_method(tmp_path):
    fn, params = tx.functionalize(tiny_model().cuda())
    data = Images(9, unlabeled=(2,))
    store = tx.attribute_dataset(tx.grad_cam, fn, params, data, out=tmp_path / "s", batch_size=4,
                                 layer="features", progress=False)
    for start in range(0, 9, 4):
        items = [data[i] for i in range(start, min(start + 4, 9))]
        x = torch.stack([a for a, _ in items]).cuda()
        t = torch.tensor([b for _, b in items]).cuda()
        with torch.no_grad():
            pred = fn(params, x).argmax(1)
        want = tx.grad_cam(fn, params, x, torch.where(t < 0, pred, t), layer="features")
        assert torch.equal(store.maps[start:start + len(items)], want.cpu())
        assert torch.equal(store.predictions[start:start + len(items)], pred.cpu())


# ------------------------------------------------------------------------------- killed mid-run
KILLED = SETUP + textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from torchex_fn.composite.runner import codec
    out, mode, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    write, calls = codec.write_atomic, []

    def hang():
        marker.write_text("now")
        time.sleep(120)

    def slow_write(path, t):
        calls.append(path.name)
        if mode == "mid_write" and len(calls) == 5:  # batch 2's meta file: half of it, then die
            data, owner = codec.raw(t)
            with open(path.with_name(f".{path.name}.tmp{os.getpid()}"), "wb") as f:
                f.write(codec.npy_header(owner) + bytes(data[: len(data) // 2]))
            hang()
        write(path, t)
        if mode == "between_files" and len(calls) == 3:  # batch 1's meta committed, its maps not
            hang()
        if mode == "after_shards" and len(calls) == 4:  # two whole shards
            hang()
    codec.write_atomic = slow_write
    torch.set_num_threads(1)
    fn, params = tx.functionalize(tiny_model())
    tx.attribute_dataset(tx.grad_cam, fn, params, Images(14), out=out, batch_size=4, layer="features",
                         progress=False)
    sys.exit(3)  # never reached: killed before
''')


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


@pytest.mark.parametrize("mode, stored", [("after_shards", 2), ("between_files", 1), ("mid_write", 2)])
def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path, mode, stored):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out, marker = tmp_path / "s", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(script), str(out), mode, str(marker)], env=_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the worker exited with {proc.returncode} before the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    shards = out / "shards"
    complete = sorted(p.name for p in shards.glob("*.maps.npy"))
    assert complete == [f"{b:06d}.maps.npy" for b in range(stored)]
    if mode == "mid_write":
        assert list(shards.glob(".*.tmp*")), "the kill should leave a partial temporary file"
    if mode == "between_files":
        assert (shards / "000001.meta.npy").exists() and not (shards / "000001.maps.npy").exists()
    inodes = {name: (shards / name).stat().st_ino for name in complete}
    assert not (out / "index.json").exists()

    store = run(out, Images(14))
    reference = run(tmp_path / "uninterrupted", Images(14))
    assert torch.equal(store.maps[0:14], reference.maps[0:14])
    assert torch.equal(store.indices, torch.arange(14))  # every example exactly once, in order
    assert torch.equal(store.targets, reference.targets) and torch.equal(store.predictions, reference.predictions)
    assert {name: (shards / name).stat().st_ino for name in complete} == inodes  # not rewritten
    assert sorted(p.name for p in shards.iterdir()) == sorted(
        f"{b:06d}.{kind}.npy" for b in range(4) for kind in ("maps", "meta"))  # no leftovers
    for name in ("maps", "meta"):
        assert (shards / f"000003.{name}.npy").read_bytes() == \
            (tmp_path / "uninterrupted" / "shards" / f"000003.{name}.npy").read_bytes()


# ------------------------------------------------------------------------------------ torchrun
DISTRIBUTED = SETUP + textwrap.dedent('''
    import os, sys
    import torch.distributed as dist
    from torchex_fn.composite.runner import codec
    write, wrote = codec.write_atomic, []
    def recording(path, t):
        wrote.append(path.name)
        write(path, t)
    codec.write_atomic = recording
    torch.set_num_threads(1)
    fn, params = tx.functionalize(tiny_model())
    store = tx.attribute_dataset(tx.grad_cam, fn, params, Images(22, unlabeled=(3, 17)), out=sys.argv[1],
                                 batch_size=4, layer="features", progress=False)
    assert not dist.is_initialized()  # the group it created is gone again
    # One file per rank: the two workers share the launcher's stdout, where their lines can interleave.
    with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.txt", "w") as f:
        f.write(f"{os.environ['WORLD_SIZE']} {len(store)}\\n")
        f.write(",".join(sorted(n for n in wrote if n.endswith(".maps.npy"))))
''')


def test_two_gloo_processes_write_the_same_store_as_one(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DISTRIBUTED)
    out = tmp_path / "two"
    # A session of its own, so that a time-out ends the launcher *and* its workers (they would outlive it).
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [(tmp_path / f"two.rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert [r[0] for r in reports] == ["2 22", "2 22"]  # world size 2, every rank sees all 22 maps
    assert reports[0][1].split(",") == [f"{b:06d}.maps.npy" for b in (0, 2, 4)]  # disjoint, every other batch
    assert reports[1][1].split(",") == [f"{b:06d}.maps.npy" for b in (1, 3, 5)]
    two = tx.open_attributions(out)
    one = run(tmp_path / "one", Images(22, unlabeled=(3, 17)))
    assert torch.equal(two.maps[0:22], one.maps[0:22])
    assert torch.equal(two.indices, torch.arange(22))
    assert torch.equal(two.targets, one.targets) and torch.equal(two.predictions, one.predictions)
    for b in range(6):  # the shards themselves, byte for byte
        assert (out / "shards" / f"{b:06d}.maps.npy").read_bytes() == \
            (tmp_path / "one" / "shards" / f"{b:06d}.maps.npy").read_bytes()
