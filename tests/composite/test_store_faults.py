"""The store of attribute_dataset under the faults a long run meets (issue 22): a resumed run bit-identical to an
uninterrupted one (20 interruptions, and a resume under another thread count), SIGKILL at random times, a
flipped byte in any file, a full disk at every file, two runs on one folder, and a store of the older format."""
import errno
import json
import os
import random
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from support import store_runs
from support.store_runs import Images, run

import torchex_fn as tx
from torchex_fn.composite.runner import codec, store

REFERENCES = Path(__file__).resolve().parents[1] / "references"

pytestmark = pytest.mark.usefixtures("one_thread")


def files(root):
    """Every file of a store but the lock, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 12 examples in batches of 2 (one thread), its files byte by byte."""
    out = tmp_path_factory.mktemp("reference") / "s"
    torch.set_num_threads(1)
    run(out, 12, 2)
    return files(out)


def interrupted(out, n, batch_size, fail_at):
    """A run stopped when the writer reaches its ``fail_at``-th .npy file (as Ctrl-C would stop it)."""
    write, calls = codec.write_atomic, []

    def dies(path, t):
        calls.append(path)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        write(path, t)
    codec.write_atomic = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            run(out, n, batch_size)
    finally:
        codec.write_atomic = write


# ------------------------------------------------------------------------- resume, bit for bit
def test_a_resumed_run_equals_an_uninterrupted_one_20_times(tmp_path, reference):
    rng = random.Random(22)
    for trial in range(20):
        out = tmp_path / f"t{trial}"
        fail_at = rng.randrange(1, 12)  # any .npy file of the 6 batches (meta, maps, meta, ...)
        interrupted(out, 12, 2, fail_at)
        kept = sorted(p.name for p in (out / "shards").glob("*.maps.npy"))
        assert len(kept) == (fail_at - 1) // 2 and not (out / "index.json").exists()
        resumed = run(out, 12, 2)
        assert files(out) == reference, f"trial {trial} (stopped at file {fail_at})"
        assert torch.equal(resumed.indices, torch.arange(12))


def test_a_resumed_run_computes_with_the_thread_count_of_the_first(tmp_path, reference):
    # CPU kernels may split their work (and their sums) by thread count: the stem convolution gives ~1e-9
    # differences at 3 threads against 1 on the shared machine. A resume pins the count of the first run.
    out = tmp_path / "s"
    seen = []

    def saliency(fn, params, x, target):
        seen.append(torch.get_num_threads())
        return tx.saliency(fn, params, x, target)
    fn, params = tx.functionalize(store_runs.stem_model())
    write, calls = codec.write_atomic, []

    def dies(path, t):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        write(path, t)
    codec.write_atomic = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            tx.attribute_dataset(saliency, fn, params, Images(12), out=out, batch_size=2, progress=False)
    finally:
        codec.write_atomic = write
    assert set(seen) == {1}
    seen.clear()
    torch.set_num_threads(3)
    tx.attribute_dataset(saliency, fn, params, Images(12), out=out, batch_size=2, progress=False)
    assert seen and set(seen) == {1}  # the resumed batches ran with the first run's single thread
    assert torch.get_num_threads() == 3  # and the caller's count is back
    maps = {k: v for k, v in files(out).items() if k.startswith(("shards", "checks"))}
    assert maps == {k: v for k, v in reference.items() if k.startswith(("shards", "checks"))}
    assert json.loads((out / "manifest.json").read_text())["compute"]["threads"] == 1


# --------------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_random_times_then_resume(tmp_path, reference):
    """Each trial starts the run in a child process, kills it with SIGKILL at a random time within the run's
    length, checks what is visible, resumes here and compares every file with an uninterrupted run.
    TORCHEX_FN_KILL_TRIALS=50 runs the issue's 50 trials (8 by default, to stay fast)."""
    trials = int(os.environ.get("TORCHEX_FN_KILL_TRIALS", "8"))
    ctx = store_runs.forkserver()
    for name in ("warm", "whole"):  # the first child starts the forkserver (imports): the second is timed
        start = time.monotonic()
        child = ctx.Process(target=store_runs.killable, args=(tmp_path / name, 12, 2, 1))
        child.start()
        child.join(120)
        length = time.monotonic() - start
        assert child.exitcode == 0 and files(tmp_path / name) == reference  # what this process computes
    rng = random.Random(50)
    outcomes = []
    for trial in range(trials):
        out = tmp_path / f"k{trial}"
        start = time.monotonic()
        child = ctx.Process(target=store_runs.killable, args=(out, 12, 2, 1))
        child.start()
        time.sleep(max(0.0, rng.uniform(0, 1.1 * length) - (time.monotonic() - start)))
        child.kill()  # SIGKILL, unless it has finished
        child.join(60)
        assert child.exitcode in (-signal.SIGKILL, 0)
        # what a kill leaves: whole files under final names, temporary files at most
        for path in (out / "shards").glob("*.npy") if (out / "shards").is_dir() else []:
            offset, dtype, shape = codec.read_header(path)
            assert path.stat().st_size == offset + dtype.itemsize * torch.Size(shape).numel(), path
        for path in (out / "checks").glob("*.json") if (out / "checks").is_dir() else []:
            codec.read_json(path, checked=True)
        finished = (out / "index.json").exists()
        stored = len(list((out / "shards").glob("*.maps.npy"))) if (out / "shards").is_dir() else 0
        outcomes.append("finished" if finished else stored)
        resumed = run(out, 12, 2)  # takes over the lock the killed child left
        assert files(out) == reference, f"trial {trial}: killed with {outcomes[-1]} batches stored"
        assert torch.equal(resumed.indices, torch.arange(12))  # every example once, in order
        assert leftovers(out) == [] and not (out / store.LOCK).exists()
    # some kills landed inside a run (the outcomes say where, on failure)
    assert any(isinstance(o, int) for o in outcomes), f"{trials} kills in a run of {length:.2f} s: {outcomes}"


# ----------------------------------------------------------------------------- a flipped byte
def flip(path, where):
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_shard_is_detected_and_never_returned(tmp_path, reference):
    out = tmp_path / "s"
    run(out, 12, 2)
    flip(out / "shards" / "000001.maps.npy", -5)  # the lowest bit of one float of example 3: a plausible map
    store_ = tx.open_attributions(out)
    assert torch.equal(store_.maps[0:2], run(tmp_path / "again", 12, 2).maps[0:2])  # other shards are read
    damaged = r"open_attributions: expected shard file '.*000001\.maps\.npy' as it was written .* got .* bytes"
    for read in (lambda: store_.maps[3], lambda: store_.maps[1:4], lambda: list(store_.maps), store_.verify):
        with pytest.raises(ValueError, match=damaged):
            read()
    flip(out / "shards" / "000004.meta.npy", -8)  # a target or prediction
    with pytest.raises(ValueError, match=r"000004\.meta\.npy' as it was written"):
        _ = tx.open_attributions(out).targets
    # the same call again checks every shard and computes the damaged ones again, bit for bit
    assert torch.equal(run(out, 12, 2).maps[0:12], tx.open_attributions(tmp_path / "again").maps[0:12])
    assert files(out) == reference
    flip(out / "index.json", 40)
    with pytest.raises(ValueError, match=r"open_attributions: expected index.json and manifest.json as they were "
                                         r"written, got .*index\.json"):
        tx.open_attributions(out)
    flip(out / "index.json", 40)
    (out / "index.json").unlink()  # an interrupted run whose manifest is then damaged: never resumed into
    manifest = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(manifest.replace('"batch_size": 2', '"batch_size": 3'))
    with pytest.raises(ValueError, match=r"attribute_dataset: expected manifest.json of out=.* as it was written, got "
                                         r"a file that does not match its SHA-256"):
        run(out, 12, 2)
    assert not (out / "index.json").exists()


def test_a_flipped_byte_in_a_checksum_record_recomputes_its_batch(tmp_path, reference):
    out = tmp_path / "s"
    run(out, 12, 2)
    (out / "index.json").unlink()  # an interrupted run
    flip(out / "checks" / "000002.json", 30)
    before = {p.name: p.stat().st_ino for p in (out / "shards").iterdir()}
    run(out, 12, 2)
    after = {p.name: p.stat().st_ino for p in (out / "shards").iterdir()}
    assert {k for k in before if before[k] != after[k]} == {"000002.maps.npy", "000002.meta.npy"}
    assert files(out) == reference


# ---------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("victim", ["manifest.json", "checks/000002.json", "shards/000002.meta.npy",
                                    "shards/000002.maps.npy", "index.json"])
def test_a_full_disk_stops_the_run_leaves_nothing_half_written_and_resumes(tmp_path, reference, monkeypatch, victim):
    out = tmp_path / "s"
    write_all = codec._write_all

    def full(f, parts):
        if Path(f.name).name.startswith(f".{Path(victim).name}.tmp"):
            f.write(bytes(memoryview(parts[0])[:7]))  # some bytes land, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_all(f, parts)
    monkeypatch.setattr(codec, "_write_all", full)
    with pytest.raises(OSError, match=rf"attribute_dataset: could not write '.*{victim}' \(the disk is full\)"
                                      r".*Free space .* run the same call again") as caught:
        run(out, 12, 2)
    assert caught.value.errno == errno.ENOSPC
    assert leftovers(out) == [] and not (out / victim).exists() and not (out / "index.json").exists()
    assert not (out / store.LOCK).exists()
    kept = {"manifest.json": [], "index.json": [0, 1, 2, 3, 4, 5]}.get(victim, [0, 1])  # the batches before
    assert [b for b in range(6) if (out / "checks").is_dir() and store.stored(out, b, 2)] == kept
    monkeypatch.setattr(codec, "_write_all", write_all)  # space is freed
    inodes = {p.name: p.stat().st_ino for p in out.rglob("00000[01].*")}
    assert torch.equal(run(out, 12, 2).indices, torch.arange(12))
    assert files(out) == reference
    assert {p.name: p.stat().st_ino for p in out.rglob("00000[01].*") if p.name in inodes} == inodes  # kept
    assert len(inodes) == (0 if victim == "manifest.json" else 6)


# ---------------------------------------------------------------------------- two runs, one out
def test_a_second_run_on_one_out_is_refused_naming_the_lock(tmp_path, reference):
    out = tmp_path / "s"
    ctx = store_runs.forkserver()
    ready = ctx.Event()
    holder = ctx.Process(target=store_runs.hold_the_lock, args=(out, ready))
    holder.start()
    try:
        assert ready.wait(60)
        host = socket.gethostname()
        with pytest.raises(ValueError, match=rf"attribute_dataset: expected out='{out}' free for this run, got it in "
                                             rf"use by another run \(pid {holder.pid} on host '{host}', "
                                             rf"since .* UTC; lock file '{out / 'lock'}'\)"):
            run(out, 12, 2)
        assert sorted(p.name for p in out.iterdir()) == ["lock"]  # nothing written, the holder's lock kept
        assert json.loads((out / "lock").read_text())["pid"] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
    # the holder died without releasing: the kernel dropped its flock, the next run takes the file over
    assert json.loads((out / "lock").read_text())["pid"] == holder.pid
    run(out, 12, 2)
    assert files(out) == reference and not (out / "lock").exists()


def test_an_out_that_is_a_file_is_refused_before_any_lock(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match=r"attribute_dataset: expected out, a folder .* got '.*f', a file"):
        run(tmp_path / "f", 12, 2)
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_without_flock_the_holders_pid_decides(tmp_path, reference, monkeypatch):
    # some network file systems have no flock: the lock file's pid, host and process start decide
    monkeypatch.setattr(store, "fcntl", None)
    ctx = store_runs.forkserver()
    ready = ctx.Event()
    alive = ctx.Process(target=store_runs.hold_the_lock, args=(tmp_path / "elsewhere", ready))
    alive.start()

    def attempt(name, holder):
        out = tmp_path / name
        out.mkdir()
        (out / "lock").write_text(json.dumps(holder))
        run(out, 12, 2)
        return out
    try:
        assert ready.wait(60)
        living = {"pid": alive.pid, "host": socket.gethostname(), "since": "then",
                  "process_start": store._process_start(alive.pid)}
        for name, holder in (("alive", living), ("remote", {**living, "host": "another-host"})):
            with pytest.raises(ValueError, match=rf"in use by another run \(pid {alive.pid} on host "
                                                 rf"'{holder['host']}', since then; lock file"):
                attempt(name, holder)
        reused = attempt("reused", {**living, "process_start": "1"})  # that pid is now another process: stale
    finally:
        os.kill(alive.pid, signal.SIGKILL)
        alive.join(60)
    dead = attempt("dead", living)  # its process has ended: stale
    for out in (reused, dead):
        assert files(out) == reference and not (out / "lock").exists()


# ------------------------------------------------------------------------------- older formats
def test_a_store_of_format_1_is_read_and_never_resumed(tmp_path):
    import shutil
    old = tmp_path / "v1"
    shutil.copytree(REFERENCES / "store_format_1", old)
    store_ = tx.open_attributions(old)
    assert store_.format == "torchex_fn.attributions/1" and not store_.checksums
    fn, params = tx.functionalize(store_runs.format_1_model())
    x, t = store_runs.format_1_data().tensors
    with torch.no_grad():
        pred = fn(params, x).argmax(1)
    target = torch.where(t < 0, pred, t)
    want = torch.cat([tx.saliency(fn, params, x[s:s + 2], target[s:s + 2]) for s in range(0, 5, 2)])
    torch.testing.assert_close(store_.maps[0:5], want, rtol=1e-5, atol=1e-7)  # kernels of another CPU: last bits
    assert torch.equal(store_.indices, torch.arange(5)) and torch.equal(store_.targets, target)
    assert torch.equal(store_.predictions, pred)
    with pytest.raises(ValueError, match=r"attribute_dataset: expected a store of format 'torchex_fn.attributions/2'"
                                         r" .* got format 'torchex_fn.attributions/1' \(an older torchex_fn, without "
                                         r"checksums\)\. open_attributions reads it"):
        tx.attribute_dataset(tx.saliency, fn, params, store_runs.format_1_data(), out=old, batch_size=2,
                             progress=False)
    assert files(old) == files(REFERENCES / "store_format_1")  # untouched


@pytest.mark.parametrize("found", ["torchex_fn.attributions/3", None])
def test_a_store_of_an_unknown_format_is_refused(tmp_path, found):
    out = tmp_path / "s"
    run(out, 12, 2)
    for name in ("index.json", "manifest.json"):
        record = json.loads((out / name).read_text())
        record["format"] = found
        if found is None:
            del record["format"]
        record["sha256"] = codec.json_digest(record)
        (out / name).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"open_attributions: expected a store of format .* got format "
                                         rf"{found!r} in '.*index.json'"):
        tx.open_attributions(out)
    with pytest.raises(ValueError, match=r"not a format this version knows"):
        run(out, 12, 2)
