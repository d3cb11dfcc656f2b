"""The checkpoint writer: background writes, their memory bound, failures, and replacing an
earlier output."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import load_folder

from taskvec.errors import OutputError
from taskvec.io import background_writes
from taskvec.io import writer as writer_module
from taskvec.io.writer import CheckpointWriter, planned


def _tensors(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(8 + i, 5, generator=g) for i in range(n)}


def _plan(tensors: dict[str, torch.Tensor]):
    return planned((k, tuple(v.shape), v.dtype) for k, v in tensors.items())


def test_tensors_written_from_several_threads_in_rows_land_in_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module, "QUEUED_BYTES", 300)  # most writes wait for room
    tensors = _tensors()
    out = tmp_path / "out"
    with CheckpointWriter(out, _plan(tensors), shard_size=700) as w:

        def write(names: list[str]) -> None:
            for name in names:
                t = tensors[name]
                w.write(name, t[3:].clone(), row_start=3)
                w.write(name, t[:3].clone())

        names = list(tensors)
        threads = [threading.Thread(target=write, args=(names[i::3],)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        w.commit()
    assert len(list(out.glob("*.safetensors"))) > 1
    got = load_folder(out)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_bytes_waiting_stay_within_the_bound(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module, "QUEUED_BYTES", 1000)
    waiting: list[int] = []
    pwrite = os.pwrite

    def slow_pwrite(fd, data, offset):
        waiting.append(w._queue._bytes)
        threading.Event().wait(0.002)
        return pwrite(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", slow_pwrite)
    tensors = {f"t{i}": torch.full((40, 2), float(i)) for i in range(10)}  # 320 bytes each
    big = torch.arange(600.0)  # 2400 bytes: more than the bound, taken alone
    plan = _plan({**tensors, "big": big})
    with CheckpointWriter(tmp_path / "out", plan) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.write("big", big)
        w.commit()
    assert max(waiting) <= 2400 and all(b <= 1000 for b in waiting[:-1])
    got = load_folder(tmp_path / "out")
    assert torch.equal(got["big"], big) and torch.equal(got["t9"], tensors["t9"])


def test_a_failed_write_is_reported_and_nothing_is_left(tmp_path, monkeypatch) -> None:
    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.os, "pwrite", full_disk)
    tensors = _tensors(3)
    out = tmp_path / "out"
    failure = pytest.raises(OutputError, match="writing the output failed: .*No space left")
    with failure, CheckpointWriter(out, _plan(tensors)) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.commit()
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_replacing_an_output_leaves_it_intact_until_commit(tmp_path, monkeypatch) -> None:
    old = tmp_path / "out"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old weights")
    (old / "sub").mkdir()
    (old / "sub" / "notes.txt").write_text("kept")
    (old / "link").symlink_to(tmp_path / "elsewhere")
    advised: list[str] = []
    fadvise = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fadvise(fd, offset, length, advice)

    monkeypatch.setattr(writer_module.os, "posix_fadvise", record)
    tensors = _tensors(2)
    w = CheckpointWriter(old, _plan(tensors), overwrite=True)
    # the old files' cached pages are dropped up front (symlinks are not followed) ...
    assert sorted(Path(p).name for p in advised) == ["model.safetensors", "notes.txt"]
    w.abort()
    # ... but a merge that fails leaves them as they were
    assert (old / "model.safetensors").read_bytes() == b"old weights"
    assert (old / "sub" / "notes.txt").read_text() == "kept"
    with CheckpointWriter(old, _plan(tensors), overwrite=True) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.commit()
    assert not (old / "sub").exists()
    assert torch.equal(load_folder(old)["t1"], tensors["t1"])


@pytest.mark.parametrize("before", ["", "gc.disable();"])
def test_import_leaves_the_collector_as_it_found_it(before: str) -> None:
    code = f"import gc; {before} was = gc.isenabled(); import taskvec; print(was == gc.isenabled())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "True"


def test_disk_writes_start_in_the_background_for_every_range_written(tmp_path, monkeypatch) -> None:
    started: list[tuple[str, int, int]] = []

    def record(fd: int, offset: int, length: int) -> None:
        started.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    monkeypatch.setattr(background_writes, "_start_writeback", record)
    tensors = _tensors(4)
    with CheckpointWriter(tmp_path / "out", _plan(tensors), shard_size=400) as w:
        for k, v in tensors.items():
            w.write(k, v[:2].clone())
            w.write(k, v[2:].clone(), row_start=2)
        w.commit()
    # every byte written is handed over, while its file is still open (the path is the
    # temporary folder's)
    assert sum(length for _, _, length in started) == sum(v.numel() * 4 for v in tensors.values())
    assert all(".out.tmp-" in path for path, _, _ in started)
    assert len({path for path, _, _ in started}) > 1  # several shards


def test_a_write_after_abort_is_refused(tmp_path) -> None:
    tensors = _tensors(2)
    w = CheckpointWriter(tmp_path / "out", _plan(tensors))
    w.write("t0", tensors["t0"])
    w.abort()
    with pytest.raises(OutputError, match="after the output was closed"):
        w.write("t1", tensors["t1"])
    assert list(tmp_path.iterdir()) == []


def test_the_queue_refuses_a_write_once_closed(tmp_path) -> None:
    queue = background_writes.WriteQueue(1 << 20)
    queue.close()
    data = torch.zeros(4)
    write = background_writes.Write(-1, 0, memoryview(data.numpy()), data)
    with pytest.raises(OutputError, match="after the output was closed"):
        queue.put(write)
