"""Every bad input: a non-zero exit, one line on stderr naming the problem (no traceback), and
nothing in the output path (neither the output nor a temporary sibling folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import Result
from conftest import Family, load_folder, run_cli, tree_digest
from safetensors.torch import save_file

Check = Callable[[Path], None]


def one_error_line(res: Result | subprocess.CompletedProcess[str], *needles: str) -> str:
    """The single visible stderr line (a progress bar erased with ``\\r`` does not count)."""
    code = res.exit_code if isinstance(res, Result) else res.returncode
    stderr = res.stderr
    assert code not in (0, None), f"exit status {code}"
    if isinstance(res, Result):
        assert isinstance(res.exception, SystemExit), f"unexpected exception {res.exception!r}"
    assert "Traceback" not in stderr, stderr
    visible = [seg.split("\r")[-1] for seg in stderr.split("\n")]
    visible = [line for line in visible if line.strip()]
    assert len(visible) == 1, f"expected one line on stderr, got {visible}"
    line = visible[0]
    assert line.startswith("taskvec: error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def write_config(path: Path, cfg: dict[str, Any] | str) -> Path:
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def ta(fam: Family, models: list[Path], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in models],
        "parameters": {"lambda": 1.0},
    }
    cfg.update(extra)
    return cfg


def with_tensor(fam: Family, folder: Path, name: str, value: torch.Tensor) -> Path:
    """A fine-tune of ``fam`` with one tensor replaced, as a single safetensors file."""
    sd = dict(fam.ft_sds[0])
    sd[name] = value
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


PROBE = "pooler.dense.weight"


# --------------------------------------------------------------------------------------------
# Missing paths
# --------------------------------------------------------------------------------------------


def test_missing_model_in_config(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    missing = tmp_path / "no-such-model"
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[0], missing]))
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, str(missing), "no such")
    no_leftovers(tmp_path / "out")


def test_missing_config_file(tmp_path: Path, no_leftovers: Check) -> None:
    res = run_cli("merge", tmp_path / "nope.yml", tmp_path / "out", "--no-progress")
    one_error_line(res, "nope.yml", "not found")
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("which", ["base", "finetuned"])
def test_missing_diff_input(bert: Family, tmp_path: Path, no_leftovers: Check, which: str) -> None:
    missing = tmp_path / "gone"
    args = [missing, bert.fts[0]] if which == "base" else [bert.base, missing]
    res = run_cli("diff", *args, tmp_path / "out", "--no-progress")
    one_error_line(res, str(missing), "no such file or folder")
    no_leftovers(tmp_path / "out")


def test_missing_task_vector_in_apply(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    res = run_cli("apply", bert.base, tmp_path / "tau", "-o", tmp_path / "out", "--no-progress")
    one_error_line(res, str(tmp_path / "tau"), "no such file or folder")
    no_leftovers(tmp_path / "out")


def test_apply_without_out(bert: Family, tmp_path: Path) -> None:
    tau = tmp_path / "tau"
    assert run_cli("diff", bert.base, bert.fts[0], tau, "--no-progress").exit_code == 0
    before = tree_digest(tau)
    res = run_cli("apply", bert.base, tau, "--no-progress")
    assert res.exit_code == 2  # a usage error
    assert "OUT" in res.stderr and "Traceback" not in res.stderr
    assert tree_digest(tau) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tau"]


def test_info_missing_path(tmp_path: Path) -> None:
    one_error_line(run_cli("info", tmp_path / "gone"), "gone", "no such file or folder")


def test_apply_refuses_a_model_as_task_vector(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    res = run_cli("apply", bert.base, bert.fts[0], "-o", tmp_path / "out", "--no-progress")
    one_error_line(res, str(bert.fts[0]), "not a task vector")
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------------


def test_method_typo_suggests_the_name(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts, merge_method="task_arithmatic"))
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, "'task_arithmatic'", "did you mean 'task_arithmetic'")
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c.update(lamda=1.0), "unknown config key 'lamda'"),
        (lambda c: c["models"][0].update(paramters={}), "models.0.paramters"),
        (lambda c: c["parameters"].update(lamda=1.0), "lamda"),
    ],
    ids=["top-level", "per-model", "method-parameter"],
)
def test_unknown_config_key(
    bert: Family,
    tmp_path: Path,
    no_leftovers: Check,
    mutate: Callable[[dict[str, Any]], None],
    needle: str,
) -> None:
    cfg = ta(bert, bert.fts)
    mutate(cfg)
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    one_error_line(res, needle)
    no_leftovers(tmp_path / "out")


def test_malformed_yaml(tmp_path: Path, no_leftovers: Check) -> None:
    cfg = write_config(tmp_path / "c.yml", "merge_method: linear\nmodels: [\n  - model: a\n")
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, "c.yml", "malformed YAML")
    no_leftovers(tmp_path / "out")


def test_binary_file_as_config(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    """A weight file passed where the config goes."""
    shard = sorted(bert.base.glob("*.safetensors"))[0]
    res = run_cli("merge", shard, tmp_path / "out", "--no-progress")
    one_error_line(res, str(shard), "not a text file")
    no_leftovers(tmp_path / "out")


def test_config_not_a_mapping(tmp_path: Path, no_leftovers: Check) -> None:
    cfg = write_config(tmp_path / "c.yml", "- just\n- a list\n")
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, "mapping")
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Incompatible or corrupt checkpoints
# --------------------------------------------------------------------------------------------


def test_shape_mismatch_in_merge(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    odd = with_tensor(bert, tmp_path / "odd", PROBE, torch.zeros(32, 16))
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[0], odd]))
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, "shape mismatch", repr(PROBE), "[32, 32]", "[32, 16]")
    no_leftovers(tmp_path / "out")


def test_shape_mismatch_in_diff(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    odd = with_tensor(bert, tmp_path / "odd", PROBE, torch.zeros(16, 32))
    res = run_cli("diff", bert.base, odd, tmp_path / "out", "--no-progress")
    one_error_line(res, "shape mismatch", repr(PROBE), "[32, 32]", "[16, 32]")
    no_leftovers(tmp_path / "out")


def _corrupt_copy(src: Path, dst: Path, damage: Callable[[bytes], bytes]) -> Path:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[1]
    shard.write_bytes(damage(shard.read_bytes()))
    return shard


def test_truncated_shard(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    shard = _corrupt_copy(bert.fts[0], tmp_path / "cut", lambda b: b[: len(b) * 2 // 3])
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[1], tmp_path / "cut"]))
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, str(shard), "truncated")
    no_leftovers(tmp_path / "out")


def test_garbage_shard_header_in_a_real_process(bert: Family, tmp_path: Path) -> None:
    """Run as a real process: a half-built reader must not print anything when collected."""
    shard = _corrupt_copy(
        bert.fts[0], tmp_path / "bad", lambda b: (16).to_bytes(8, "little") + b"{garbage!" + b[17:]
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskvec.cli",
            "diff",
            str(bert.base),
            str(tmp_path / "bad"),
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    one_error_line(proc, str(shard), "corrupt", "header")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_garbage_header_reader_cleans_up_quietly(tmp_path: Path) -> None:
    """Same as above, in-process: no "Exception ignored in __del__" when the reader that
    refused the file is garbage-collected."""
    import gc

    from taskvec.errors import CheckpointError
    from taskvec.io.checkpoint import SafetensorsFile

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((9).to_bytes(8, "little") + b"not json!")
    seen: list[object] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with pytest.raises(CheckpointError, match="header is not JSON"):
            SafetensorsFile(bad)
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert not seen, [getattr(u, "exc_value", u) for u in seen]


def test_corrupt_pickle_checkpoint(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 4)
    res = run_cli("diff", bert.extra["pt-base"], bad, tmp_path / "out", "--no-progress")
    one_error_line(res, str(bad), "cannot load")
    no_leftovers(tmp_path / "out")


def test_index_naming_a_missing_shard(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    shutil.copytree(bert.fts[0], tmp_path / "holey")
    victim = sorted((tmp_path / "holey").glob("*.safetensors"))[0]
    victim.unlink()
    res = run_cli("diff", bert.base, tmp_path / "holey", tmp_path / "out", "--no-progress")
    one_error_line(res, victim.name, "does not exist")
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------


def _with_inf(bert: Family, folder: Path) -> Path:
    w = bert.ft_sds[0][PROBE].clone()
    w[3, 5] = float("inf")
    return with_tensor(bert, folder, PROBE, w)


def test_inf_in_a_fine_tune_stops_the_merge(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    inf = _with_inf(bert, tmp_path / "inf")
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[1], inf]))
    # with the progress bar on: it is erased, the error is the only visible line
    res = run_cli("merge", cfg, tmp_path / "out")
    one_error_line(res, repr(PROBE), "NaN/Inf")
    no_leftovers(tmp_path / "out")


def test_inf_in_a_fine_tune_stops_diff(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    inf = _with_inf(bert, tmp_path / "inf")
    res = run_cli("diff", bert.base, inf, tmp_path / "out", "--no-progress")
    one_error_line(res, repr(PROBE), "NaN/Inf")
    no_leftovers(tmp_path / "out")


def test_overflow_to_inf_in_the_output_dtype(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    tau = tmp_path / "tau"
    assert run_cli("diff", bert.base, bert.fts[0], tau, "--no-progress").exit_code == 0
    res = run_cli(
        "apply",
        bert.base,
        tau,
        "-o",
        tmp_path / "out",
        "--scale",
        "1e7",
        "--dtype",
        "float16",
        "--no-progress",
    )
    one_error_line(res, "NaN/Inf", "float16")
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Output handling: existing outputs, --overwrite, --dry-run
# --------------------------------------------------------------------------------------------


def test_existing_output_and_overwrite(bert: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = write_config(tmp_path / "good.yml", ta(bert, bert.fts))
    assert run_cli("merge", good, out, "--no-progress").exit_code == 0
    first = tree_digest(out)

    # refused without --overwrite, before any work; the output is untouched
    for args in (
        ["merge", good, out],
        ["diff", bert.base, bert.fts[0], out],
    ):
        res = run_cli(*args, "--no-progress")
        one_error_line(res, str(out), "already exists", "--overwrite")
        assert tree_digest(out) == first

    # a failing --overwrite leaves the old output as it was, and no temporary sibling
    inf = _with_inf(bert, tmp_path / "inf")
    bad = write_config(tmp_path / "bad.yml", ta(bert, [inf]))
    res = run_cli("merge", bad, out, "--overwrite", "--no-progress")
    one_error_line(res, "NaN/Inf")
    assert tree_digest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # a successful --overwrite replaces it
    other = ta(bert, bert.fts)
    other["parameters"]["lambda"] = 0.25
    res = run_cli(
        "merge", write_config(tmp_path / "other.yml", other), out, "--overwrite", "--no-progress"
    )
    assert res.exit_code == 0, res.stderr
    assert tree_digest(out) != first
    got = load_folder(out)
    b, f0, f1 = bert.base_sd[PROBE], bert.ft_sds[0][PROBE], bert.ft_sds[1][PROBE]
    torch.testing.assert_close(got[PROBE], b + 0.25 * (0.5 * (f0 - b) + 0.5 * (f1 - b)))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_dry_run_writes_nothing_and_prints_the_plan(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts))
    res = run_cli("merge", cfg, tmp_path / "out", "--dry-run", "--threads", "2")
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    n = len(bert.base_sd)
    nbytes = sum(v.numel() * v.element_size() for v in bert.base_sd.values())
    lines = {
        ln.split(":")[0].strip(): ln.split(":", 1)[1].strip()
        for ln in res.stdout.splitlines()
        if ":" in ln
    }
    assert lines["tensors"] == str(n)
    assert lines["bytes to read"] == f"{3 * nbytes / 1024:.1f} KiB"  # base + 2 fine-tunes
    assert lines["bytes to write"] == f"{nbytes / 1024:.1f} KiB"
    assert "est. peak memory" in lines
    assert "nothing was written" in res.stdout
    no_leftovers(tmp_path / "out")


def test_dry_run_reports_problems_and_fails(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    odd = with_tensor(bert, tmp_path / "odd", PROBE, torch.zeros(32, 16))
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[0], odd]))
    res = run_cli("merge", cfg, tmp_path / "out", "--dry-run")
    assert res.exit_code == 1
    assert "shape mismatch" in res.stderr and repr(PROBE) in res.stderr
    assert "Traceback" not in res.stderr
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Inputs are never modified
# --------------------------------------------------------------------------------------------


def test_inputs_are_never_modified(bert: Family, tmp_path: Path) -> None:
    inputs = [bert.base, *bert.fts, *bert.extra.values()]
    before = {str(p): tree_digest(p) for p in inputs}
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts))
    assert run_cli("merge", cfg, tmp_path / "m", "--no-progress").exit_code == 0
    bin_cfg = ta(bert, [bert.extra["bin-ft0"], bert.extra["pt-ft1"]])
    bin_cfg["base_model"] = str(bert.extra["st-base"])
    assert (
        run_cli(
            "merge", write_config(tmp_path / "b.yml", bin_cfg), tmp_path / "mb", "--no-progress"
        ).exit_code
        == 0
    )
    assert run_cli("diff", bert.base, bert.fts[0], tmp_path / "t", "--no-progress").exit_code == 0
    res = run_cli("apply", bert.base, tmp_path / "t", "-o", tmp_path / "a", "--no-progress")
    assert res.exit_code == 0
    assert run_cli("info", bert.extra["bin-base"]).exit_code == 0
    # and failures (Inf produced) do not touch them either
    inf = _with_inf(bert, tmp_path / "inf")
    assert run_cli("diff", bert.base, inf, tmp_path / "x", "--no-progress").exit_code == 1
    after = {str(p): tree_digest(p) for p in inputs}
    assert after == before


# --------------------------------------------------------------------------------------------
# More bad inputs known before any work
# --------------------------------------------------------------------------------------------


def test_truncated_bin_shard(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    shutil.copytree(bert.extra["bin-ft0"], tmp_path / "cut")
    shard = sorted((tmp_path / "cut").glob("pytorch_model-*.bin"))[1]
    shard.write_bytes(shard.read_bytes()[:500])
    res = run_cli(
        "diff", bert.extra["bin-base"], tmp_path / "cut", tmp_path / "out", "--no-progress"
    )
    one_error_line(res, str(shard), "cannot load")
    no_leftovers(tmp_path / "out")


def test_garbage_index(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    shutil.copytree(bert.fts[0], tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors.index.json").write_text("{not json")
    res = run_cli("diff", bert.base, tmp_path / "bad", tmp_path / "out", "--no-progress")
    one_error_line(res, "model.safetensors.index.json", "corrupt index")
    no_leftovers(tmp_path / "out")


def test_unknown_dtype(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts, out_dtype="bfloat61"))
    one_error_line(run_cli("merge", cfg, tmp_path / "out", "--no-progress"), "'bfloat61'")
    no_leftovers(tmp_path / "out")
    res = run_cli("diff", bert.base, bert.fts[0], tmp_path / "out", "--dtype", "f32x")
    one_error_line(res, "'f32x'")
    no_leftovers(tmp_path / "out")


def test_bad_shard_size(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts))
    res = run_cli("merge", cfg, tmp_path / "out", "--shard-size", "2XB", "--no-progress")
    one_error_line(res, "'2XB'")
    no_leftovers(tmp_path / "out")


def test_missing_required_parameter(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    cfg = ta(bert, bert.fts)
    del cfg["models"][1]["parameters"]
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    one_error_line(res, str(bert.fts[1]), "'weight'")
    no_leftovers(tmp_path / "out")


def test_parameters_that_produce_nan_are_refused_before_work(
    bert: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(bert.fts[0]), "parameters": {"weight": 1.0}},
            {"model": str(bert.fts[1]), "parameters": {"weight": -1.0}},
        ],
    }
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    one_error_line(res, "sum to zero")
    no_leftovers(tmp_path / "out")


def test_output_parent_missing(bert: Family, tmp_path: Path) -> None:
    """Missing parent folders are made (umask applied), as users expect; a failed run removes
    the ones it made; a parent that is a file is refused."""
    out = tmp_path / "no" / "such" / "out"
    res = run_cli("diff", bert.base, bert.fts[0], out, "--no-progress")
    assert res.exit_code == 0, res.stderr
    assert load_folder(out).keys() == load_folder(bert.base).keys() - {"embeddings.position_ids"}
    assert (tmp_path / "no").stat().st_mode & 0o777 == 0o777 & ~_umask()

    inf = _with_inf(bert, tmp_path / "inf")
    res = run_cli("diff", bert.base, inf, tmp_path / "new" / "out", "--no-progress")
    one_error_line(res, "NaN/Inf")
    assert not (tmp_path / "new").exists()

    (tmp_path / "file").write_text("not a folder")
    for target in (tmp_path / "file" / "out", tmp_path / "file" / "sub" / "out"):
        res = run_cli("diff", bert.base, bert.fts[0], target, "--no-progress")
        one_error_line(res, str(tmp_path / "file"), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "not a folder"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_different_architectures(
    bert: Family, llama: Family, tmp_path: Path, no_leftovers: Check
) -> None:
    res = run_cli("diff", bert.base, llama.fts[0], tmp_path / "out", "--no-progress")
    one_error_line(res, "same architecture")
    no_leftovers(tmp_path / "out")
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[0], llama.fts[0]]))
    res = run_cli("merge", cfg, tmp_path / "out", "--no-progress")
    one_error_line(res, str(llama.fts[0]), "has no tensor", "more problem")
    no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("threads", ["1", "2"])
def test_interrupt_mid_merge_leaves_nothing(
    bert: Family,
    tmp_path: Path,
    no_leftovers: Check,
    monkeypatch: pytest.MonkeyPatch,
    threads: str,
) -> None:
    import taskvec.engine

    real = taskvec.engine.check_finite
    calls = []

    def interrupt_on_the_fifth(name: str, tensor: torch.Tensor) -> None:
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(name, tensor)

    monkeypatch.setattr(taskvec.engine, "check_finite", interrupt_on_the_fifth)
    cfg = write_config(tmp_path / "c.yml", ta(bert, bert.fts))
    res = run_cli("merge", cfg, tmp_path / "out", "--threads", threads, "--no-progress")
    assert res.exit_code == 130
    assert res.stderr.strip() == "taskvec: interrupted; nothing was written"
    no_leftovers(tmp_path / "out")


def test_checkpoint_without_tensors(bert: Family, tmp_path: Path, no_leftovers: Check) -> None:
    """A state dict nested under another key, or an empty file, is refused instead of giving
    an empty merge."""
    nested = tmp_path / "nested.pt"
    torch.save({"model": bert.base_sd}, nested)
    cfg = ta(bert, [bert.extra["pt-ft0"]])
    cfg["base_model"] = str(nested)
    res = run_cli("merge", write_config(tmp_path / "c.yml", cfg), tmp_path / "out", "--no-progress")
    one_error_line(res, str(nested), "no tensors", "keys: model")
    no_leftovers(tmp_path / "out")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    one_error_line(run_cli("info", empty), str(empty), "holds no tensors")


# --------------------------------------------------------------------------------------------
# --overwrite never replaces an input (or a folder holding one)
# --------------------------------------------------------------------------------------------


def _inputs_in(tmp_path: Path, bert: Family) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(bert.base, models / "base")
    shutil.copytree(bert.fts[0], models / "ft")
    (models / "notes.txt").write_text("not a model, and not ours to delete")
    return models


@pytest.mark.parametrize("target", ["input", "parent"])
def test_overwrite_refuses_an_input_as_output(bert: Family, tmp_path: Path, target: str) -> None:
    models = _inputs_in(tmp_path, bert)
    out = models / "ft" if target == "input" else models
    before = tree_digest(models)
    res = run_cli("diff", models / "base", models / "ft", out, "--overwrite", "--no-progress")
    one_error_line(res, "would replace the input")
    tau = tmp_path / "tau"
    assert run_cli("diff", models / "base", models / "ft", tau, "--no-progress").exit_code == 0
    out = models / "base" if target == "input" else models
    res = run_cli("apply", models / "base", tau, out, "--overwrite", "--no-progress")
    one_error_line(res, "would replace the input")
    assert tree_digest(models) == before
    assert not [p for p in tmp_path.rglob(".*")]


def test_merge_overwrite_refuses_an_input_as_output(bert: Family, tmp_path: Path) -> None:
    models = _inputs_in(tmp_path, bert)
    before = tree_digest(models)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(models / "base"),
        "models": [{"model": str(models / "ft"), "parameters": {"weight": 1.0}}],
    }
    res = run_cli(
        "merge", write_config(tmp_path / "c.yml", cfg), models, "--overwrite", "--no-progress"
    )
    try:
        one_error_line(res, "would replace the input")
    finally:
        assert tree_digest(models) == before


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_nan_or_inf_anywhere_in_a_tensor(
    bert: Family, tmp_path: Path, no_leftovers: Check, bad: float, threads: str
) -> None:
    name = "encoder.layer.1.output.dense.weight"
    w = bert.ft_sds[0][name].clone()
    w[-1, -1] = bad  # the very last element
    odd = with_tensor(bert, tmp_path / "odd", name, w)
    cfg = write_config(tmp_path / "c.yml", ta(bert, [bert.fts[1], odd]))
    res = run_cli("merge", cfg, tmp_path / "out", "--threads", threads, "--no-progress")
    one_error_line(res, repr(name), "1 NaN/Inf")
    no_leftovers(tmp_path / "out")
