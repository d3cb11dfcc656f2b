"""The output's life: one writer at a time, SIGTERM and SIGKILL, atomic replacement, fsync,
folder modes and parents, and the manifest that ``taskvec verify`` checks (issue 13)."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Family, load_folder, run_cli, tree_digest
from safetensors.torch import load_file, save_file
from test_foundation_errors import Check, one_error_line, write_config

from taskvec.algebra import load_model
from taskvec.errors import OutputError
from taskvec.io import writer as writer_module
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.fingerprint import content_fingerprint, tensor_bytes_digest
from taskvec.io.manifest import MANIFEST
from taskvec.io.writer import CheckpointWriter, planned
from taskvec.merge import merge


def _ta(fam: Family, **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in fam.fts[:2]],
        **extra,
    }


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(6 + i, 4, generator=g) for i in range(4)}


def _writer(out: Path, **kw: Any) -> CheckpointWriter:
    t = _tensors()
    return CheckpointWriter(out, planned((k, tuple(v.shape), v.dtype) for k, v in t.items()), **kw)


def _fill(w: CheckpointWriter) -> None:
    for k, v in _tensors().items():
        w.write(k, v)


def _taskvec(*args: str | Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """``taskvec ARGS`` as a real process (signals act on it), optionally with a fault."""
    env = {k: v for k, v in os.environ.items() if k != "TASKVEC_FAULT"}
    if fault:
        env["TASKVEC_FAULT"] = fault
    cmd = [sys.executable, "-m", "taskvec.cli", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------------


def test_a_second_writer_of_the_same_output_fails_at_once(bert: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _writer(out)
    cfg = write_config(tmp_path / "c.yml", _ta(bert))
    res = run_cli("merge", cfg, out, "--no-progress")
    one_error_line(res, str(out), f"being written by another taskvec process (pid {os.getpid()})")
    with pytest.raises(OutputError, match="another taskvec process"):
        _writer(out, overwrite=True)
    _fill(first)
    first.commit()
    assert torch.equal(load_folder(out)["t2"], _tensors()["t2"])
    assert _siblings(out) == []  # the lock file goes with the writer


def test_a_lock_file_left_by_a_killed_writer_does_not_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text(f"{_dead_pid()}\n")  # no process holds it
    with _writer(out) as w:
        _fill(w)
        w.commit()
    assert out.is_dir() and _siblings(out) == []


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = _writer(out)
    _fill(w)
    out.mkdir()  # empty: a plain rename would silently replace it
    (tmp_path / "other").mkdir()
    with pytest.raises(OutputError, match="already exists .*appeared while this one"):
        w.commit()
    assert list(out.iterdir()) == [] and _siblings(out) == []


# --------------------------------------------------------------------------------------------
# Signals and leftovers
# --------------------------------------------------------------------------------------------


def test_sigterm_mid_merge_removes_everything(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    cfg = write_config(tmp_path / "c.yml", _ta(bert))
    out = tmp_path / "out"
    res = _taskvec("merge", cfg, out, "--shard-size", "24KB", fault="piece-written:4:TERM")
    assert res.returncode == 143, res.stderr
    assert res.stderr.strip() == "taskvec: terminated; nothing was written"
    no_leftovers(out)


def test_sigkill_leftovers_fail_verify_and_the_next_writer_removes_them(
    bert: Family, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = write_config(tmp_path / "c.yml", _ta(bert))
    out = tmp_path / "out"
    res = _taskvec("merge", cfg, out, "--shard-size", "24KB", fault="piece-written:4")
    assert res.returncode == -9
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert any(p.suffix == ".safetensors" and p.stat().st_size > 1000 for p in left.iterdir())
    # full-size shards with valid headers, zero-filled: not a complete output
    moved = left.rename(tmp_path / "looks-complete")
    one_error_line(run_cli("verify", moved), "no manifest: not a complete taskvec output")
    moved.rename(left)

    live = tmp_path / f".out.tmp-{os.getppid()}-abcd"  # a running process's: kept
    live.mkdir()
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    unrelated = tmp_path / f".outer.tmp-{_dead_pid()}-abcd"
    unrelated.mkdir()
    with caplog.at_level(logging.WARNING, logger="taskvec"):
        assert run_cli("merge", cfg, out, "--no-progress").exit_code == 0
    assert not left.exists() and not old.exists()
    assert live.exists() and unrelated.exists()
    assert sum("left by an interrupted taskvec run" in r.message for r in caplog.records) == 2
    assert run_cli("verify", out).exit_code == 0


# --------------------------------------------------------------------------------------------
# Replacing, fsync, modes, parents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_output_in_one_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    renamed: list[tuple[str, str]] = []
    rename = os.rename
    monkeypatch.setattr(
        writer_module.os, "rename", lambda a, b: renamed.append((str(a), str(b))) or rename(a, b)
    )
    if not swap:
        monkeypatch.setattr(writer_module, "exchange", lambda a, b: False)
    with _writer(out, overwrite=True) as w:
        _fill(w)
        w.commit()
    assert not (out / "old.txt").exists() and (out / MANIFEST).is_file()
    assert _siblings(out) == []
    moved_away = [a for a, _ in renamed if a == str(out)]
    assert bool(moved_away) != swap  # only the fallback ever moves the old output away


def test_every_file_and_folder_is_fsynced(
    bert: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    fsync = os.fsync
    out = tmp_path / "out"

    def record(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append(path + (" (after the rename)" if out.exists() else ""))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    merge(_ta(bert), out, progress=False, shard_size="24KB")
    tmp_names = {Path(p).name for p in synced if ".out.tmp-" in p}
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "tokenizer_config.json", MANIFEST} <= files
    assert files <= tmp_names, files - tmp_names
    assert f"{tmp_path} (after the rename)" in synced  # the folder that holds the output
    assert any(Path(p).name.startswith(".out.tmp-") for p in synced)  # the output folder


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folders_follow_the_umask(bert: Family, tmp_path: Path, umask: int) -> None:
    before = os.umask(umask)
    try:
        res = run_cli("diff", bert.base, bert.fts[0], tmp_path / "a" / "out", "--no-progress")
    finally:
        os.umask(before)
    assert res.exit_code == 0, res.stderr
    for folder in (tmp_path / "a", tmp_path / "a" / "out"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "a" / "out" / MANIFEST).stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_into_missing_parent_folders(bert: Family, tmp_path: Path) -> None:
    saved = load_model(bert.fts[0]).save(tmp_path / "out" / "merged", progress=False)
    assert saved == tmp_path / "out" / "merged"
    assert load_folder(saved).keys() == load_folder(bert.fts[0]).keys()
    merge(_ta(bert), tmp_path / "x" / "y" / "merged", progress=False)
    assert (tmp_path / "x" / "y" / "merged" / MANIFEST).is_file()


# --------------------------------------------------------------------------------------------
# Manifest and verify
# --------------------------------------------------------------------------------------------


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST).read_text())


def test_the_manifest_describes_the_merge(bert: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _ta(bert, parameters={"lambda": 0.8})
    merge(cfg, out, progress=False, shard_size="24KB", random_seed=7)
    m = _manifest(out)
    p = m["producer"]
    assert (p["operation"], p["method"], p["seed"], p["device"]) == (
        "merge",
        "task_arithmetic",
        7,
        "cpu",
    )
    assert p["config"]["parameters"] == {"lambda": 0.8} and p["config"]["models"][1][
        "model"
    ] == str(bert.fts[1])
    expected = {str(c): content_fingerprint(open_checkpoint(c)) for c in [*bert.fts[:2], bert.base]}
    assert {i["path"]: i["fingerprint"] for i in p["inputs"]} == expected
    assert m["taskvec_version"] and m["metadata"]["taskvec.merge_method"] == "task_arithmetic"
    got = load_folder(out)
    assert set(m["tensors"]) == set(got)
    for name, t in m["tensors"].items():
        assert load_file(str(out / t["shard"]))[name].shape == got[name].shape
        rows = got[name].shape[0] if got[name].dim() else 1
        assert t["pieces"][0][0] == 0 and t["pieces"][-1][1] == rows
        for start, stop, digest in t["pieces"]:
            part = got[name][start:stop] if got[name].dim() else got[name]
            assert tensor_bytes_digest([part]) == digest
    assert set(m["files"]) >= {"config.json", "model.safetensors.index.json", "README.md"}


def test_the_same_merge_writes_the_same_manifest(bert: Family, tmp_path: Path) -> None:
    merge(_ta(bert), tmp_path / "a" / "out", progress=False, threads=1)
    merge(_ta(bert), tmp_path / "b" / "out", progress=False, threads=2)
    assert (tmp_path / "a" / "out" / MANIFEST).read_bytes() == (
        tmp_path / "b" / "out" / MANIFEST
    ).read_bytes()


def test_diff_and_apply_outputs_have_a_manifest(bert: Family, tmp_path: Path) -> None:
    assert run_cli("diff", bert.base, bert.fts[0], tmp_path / "tv", "--no-progress").exit_code == 0
    res = run_cli("apply", bert.base, tmp_path / "tv", tmp_path / "out", "--no-progress")
    assert res.exit_code == 0, res.stderr
    for out, leaves in ((tmp_path / "tv", 2), (tmp_path / "out", 2)):
        p = _manifest(out)["producer"]
        assert p["operation"].startswith("saving") and " " in p["expression"]
        assert len(p["inputs"]) == leaves and all(i["fingerprint"] for i in p["inputs"])
        assert run_cli("verify", out).exit_code == 0


def _zero_tensor(shard: Path, name: str) -> None:
    """Overwrite the bytes of tensor ``name`` in ``shard`` with zeros (its header untouched)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    with open(shard, "r+b") as f:
        f.seek(8 + n + begin)
        f.write(bytes(end - begin))


def test_verify_names_what_differs(bert: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(_ta(bert), out, progress=False, shard_size="24KB")
    res = run_cli("verify", out)
    assert res.exit_code == 0 and "OK" in res.stdout, res.stdout
    m = _manifest(out)
    names = list(m["tensors"])
    zeroed, dropped, retyped = names[3], names[8], names[12]

    _zero_tensor(out / m["tensors"][zeroed]["shard"], zeroed)
    shard = out / m["tensors"][dropped]["shard"]
    kept = {k: v for k, v in load_file(str(shard)).items() if k != dropped}
    save_file({**kept, "intruder": torch.zeros(2)}, str(shard), metadata=m["metadata"])
    shard = out / m["tensors"][retyped]["shard"]
    changed = load_file(str(shard))
    changed[retyped] = changed[retyped].double()
    save_file(changed, str(shard), metadata=m["metadata"])
    (out / "config.json").write_text("{}")

    res = run_cli("verify", out)
    line = one_error_line(res, str(out), "5 problem(s)")
    assert line.endswith(f"in {len(names)} tensor(s)")
    lines = res.stdout.splitlines()
    assert sorted(lines) == sorted(
        [
            f"tensor {zeroed!r}: checksum differs (rows 0..{m['tensors'][zeroed]['shape'][0]})",
            f"tensor {dropped!r}: missing from {m['tensors'][dropped]['shard']}",
            f"tensor 'intruder': in {m['tensors'][dropped]['shard']} but not in the manifest",
            f"tensor {retyped!r}: header says F64 {m['tensors'][retyped]['shape']}, manifest "
            f"says F32 {m['tensors'][retyped]['shape']}",
            "file config.json: contents differ from the manifest",
        ]
    ), lines


def test_verify_without_a_manifest(bert: Family, tmp_path: Path) -> None:
    one_error_line(run_cli("verify", bert.base), "no manifest: not a complete taskvec output")
    one_error_line(run_cli("verify", tmp_path / "nothing"), "no such folder")


def test_verify_inputs_notices_a_changed_input(bert: Family, tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    ft.mkdir()
    save_file({k: v.contiguous() for k, v in bert.ft_sds[0].items()}, str(ft / "model.safetensors"))
    cfg = _ta(bert)
    cfg["models"][0]["model"] = str(ft)
    out = tmp_path / "out"
    merge(cfg, out, progress=False)
    before = tree_digest(out)
    assert run_cli("verify", out, "--inputs").exit_code == 0
    changed = {k: v.contiguous() for k, v in bert.ft_sds[0].items()}
    name = next(iter(changed))
    changed[name] = changed[name] + 1
    save_file(changed, str(ft / "model.safetensors"))
    res = run_cli("verify", out, "--inputs")
    one_error_line(res, "1 problem(s)")
    assert res.stdout.strip() == f"input {ft}: its weights changed since this output"
    assert run_cli("verify", out).exit_code == 0  # the output itself is intact
    assert tree_digest(out) == before


def test_writes_from_threads_give_the_manifest_pieces_in_row_order(tmp_path: Path) -> None:
    t = _tensors()
    out = tmp_path / "out"
    with _writer(out) as w:
        threads = [
            threading.Thread(target=w.write, args=(k, v[r : r + 2].clone(), r))
            for k, v in t.items()
            for r in range(0, v.shape[0], 2)
        ]
        for th in reversed(threads):
            th.start()
        for th in threads:
            th.join()
        w.commit()
    pieces = _manifest(out)["tensors"]["t1"]["pieces"]
    assert [(a, b) for a, b, _ in pieces] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert pieces[1][2] == tensor_bytes_digest([t["t1"][2:4]])
