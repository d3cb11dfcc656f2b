"""``taskvec merge --resume``: a merge killed (SIGKILL) anywhere, in its whole-model first pass,
while writing or while committing, never leaves a complete-looking output that is not
complete, and the rerun finishes it with the same bytes as an uninterrupted run (issue 13)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Family, run_cli, tree_digest
from test_foundation_errors import one_error_line, write_config

from taskvec.io.manifest import verify
from taskvec.merge import merge, plan_merge

# The killed runs journal their pieces in small batches, so that a kill loses little.
DRIVER = (
    "import taskvec.io.journal as j; j.FLUSH_BYTES = 20_000\n"
    "from taskvec.cli import main; main(prog_name='taskvec')"
)
OPTIONS = {"shard_size": "24KB", "threads": 2}


def _config(fam: Family) -> dict[str, Any]:
    """TIES with model-wide trimming: a whole-model first pass, then the tensor jobs."""
    return {
        "merge_method": "ties",
        "base_model": str(fam.base),
        "models": [
            {"model": str(p), "parameters": {"weight": 1.0, "density": 0.4}} for p in fam.fts
        ],
        "parameters": {"trim_scope": "model"},
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _killed_run(cfg: Path, out: Path, fault: str) -> None:
    """``taskvec merge CFG OUT --resume`` SIGKILLed at ``fault``; then OUT is absent or whole."""
    cmd = [sys.executable, "-c", DRIVER, "merge", str(cfg), str(out), "--resume", "--no-progress"]
    cmd += ["--shard-size", OPTIONS["shard_size"], "--threads", str(OPTIONS["threads"])]
    env = {**os.environ, "TASKVEC_FAULT": fault}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == -9, f"{fault}: exit {res.returncode}: {res.stderr}"
    if out.exists():  # committed: then complete
        assert verify(out)[0] == [], fault


def _schedule(tensors: int, pieces: int) -> list[list[str]]:
    """Kill points, drawn with a fixed seed: each scenario is the faults of its successive
    killed runs (the later ones kill the resumed run again)."""
    rng = random.Random(13)

    def first_pass() -> str:
        return f"first-pass:{rng.randint(1, tensors)}"

    def piece(most: int = pieces) -> str:
        return f"piece-written:{rng.randint(1, most)}"

    def flushed() -> str:
        return f"journal-flushed:{rng.randint(1, 2)}"

    return [
        [first_pass()],
        [first_pass(), flushed()],
        ["first-pass-done:1"],
        [piece()],
        [piece(pieces // 2), piece(3)],  # the second run has fewer pieces left to write
        [flushed(), flushed()],
        ["before-rename:1"],
        ["after-rename:1"],
    ]


def test_a_killed_merge_resumes_to_the_same_bytes(
    llama: Family, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = {p: tree_digest(p) for p in [llama.base, *llama.fts]}
    cfg = write_config(tmp_path / "ties.yml", _config(llama))
    reference = tmp_path / "ref" / "out"
    merge(cfg, reference, progress=False, **OPTIONS)
    expected = _files(reference)
    plain = tmp_path / "plain" / "out"
    merge(cfg, plain, progress=False, resume=True, **OPTIONS)
    assert _files(plain) == expected  # an uninterrupted resumable run writes the same bytes

    plan = plan_merge(cfg)
    schedule = _schedule(len(plan.tasks), len(plan.jobs))
    assert sum(map(len, schedule)) >= 10
    for i, faults in enumerate(schedule):
        out = tmp_path / f"run{i}" / "out"
        for fault in faults:
            _killed_run(cfg, out, fault)
        with caplog.at_level(logging.INFO, logger="taskvec"):
            caplog.clear()
            merge(cfg, out, progress=False, resume=True, **OPTIONS)
        assert _files(out) == expected, faults
        left = {p.name for p in out.parent.iterdir()} - {"out", ".out.lock"}
        assert not left, (faults, left)
        log = caplog.text
        if faults[-1] == "first-pass-done:1":
            assert "kept from the interrupted run" in log
        if faults[-1].startswith("journal-flushed"):
            assert "resuming" in log and " 0 piece(s)" not in log, log
        if faults[-1] == "before-rename:1":
            assert f"{len(plan.jobs)} piece(s) already written" in log
        if faults[-1] == "after-rename:1":
            assert "nothing left to do" in log
    assert {p: tree_digest(p) for p in inputs} == inputs


def test_a_partial_of_another_merge_is_refused(llama: Family, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "ties.yml", _config(llama))
    out = tmp_path / "out"
    _killed_run(cfg, out, "piece-written:3")
    other = _config(llama)
    other["models"][0]["parameters"]["density"] = 0.5
    other_cfg = write_config(tmp_path / "other.yml", other)
    res = run_cli("merge", other_cfg, out, "--resume", "--no-progress", "--shard-size", "24KB")
    one_error_line(res, f"{tmp_path / '.out.partial'} was started with another config/inputs")
    # without --resume the other merge runs, and the stale partial goes once it is committed
    assert run_cli("merge", other_cfg, out, "--no-progress").exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("fault", ["journal-flushed:2", "before-rename:1"])
def test_damaged_pieces_of_a_partial_are_written_again(
    llama: Family, tmp_path: Path, fault: str
) -> None:
    """The journal (or, once it is gone, the manifest) is checked against the bytes: pieces
    zeroed after the kill are recomputed."""
    cfg = write_config(tmp_path / "ties.yml", _config(llama))
    reference = tmp_path / "ref" / "out"
    merge(cfg, reference, progress=False, **OPTIONS)
    out = tmp_path / "run" / "out"
    _killed_run(cfg, out, fault)
    for shard in (tmp_path / "run" / ".out.partial").glob("*.safetensors"):
        with open(shard, "r+b") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            f.seek(start)
            f.write(bytes(shard.stat().st_size - start))
    merge(cfg, out, progress=False, resume=True, **OPTIONS)
    assert _files(out) == _files(reference)


def test_sigterm_with_resume_keeps_the_finished_part(llama: Family, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "ties.yml", _config(llama))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "taskvec.cli", "merge", str(cfg), str(out), "--resume"]
    cmd += ["--no-progress", "--shard-size", "24KB"]
    env = {**os.environ, "TASKVEC_FAULT": "piece-written:6:TERM"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 143
    assert res.stderr.strip() == (
        f"taskvec: terminated; the finished part is kept in {tmp_path / '.out.partial'}; "
        "run the same command again to continue"
    )
    assert not out.exists()
    assert run_cli(*cmd[3:]).exit_code == 0
    assert verify(out)[0] == [] and not (tmp_path / ".out.partial").exists()


def test_an_interrupted_resumable_merge_replaces_an_old_output(
    llama: Family,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C keeps the partial (its journal flushed on the way out); the rerun with
    overwrite swaps it in for the old output."""
    import taskvec.engine

    cfg = write_config(tmp_path / "ties.yml", _config(llama))
    reference = tmp_path / "ref" / "out"
    merge(cfg, reference, progress=False, **OPTIONS)
    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old output")
    real, calls = taskvec.engine.check_finite, []

    def interrupt_on_the_tenth(name: str, tensor: Any) -> None:
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real(name, tensor)

    monkeypatch.setattr(taskvec.engine, "check_finite", interrupt_on_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg, out, progress=False, resume=True, overwrite=True, **OPTIONS)
    assert (out / "old.txt").exists() and (tmp_path / "run" / ".out.partial").is_dir()
    monkeypatch.setattr(taskvec.engine, "check_finite", real)
    with caplog.at_level(logging.INFO, logger="taskvec"):
        merge(cfg, out, progress=False, resume=True, overwrite=True, **OPTIONS)
    assert "resuming" in caplog.text and " 0 piece(s)" not in caplog.text
    assert _files(out) == _files(reference)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["out"]
