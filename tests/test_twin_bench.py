"""The benchmark's ``twin`` row on the toy benchmark of test_bench: a row for every task, the
bytes of factors against the count re-derived from the shapes of the tensors an expert
moved, and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import load_folder
from test_bench import tiny_base, toy_bench, toy_tasks  # noqa: F401  (fixtures)

from taskvec.bench.harness import Bench
from taskvec.bench.suite import run_suite


def test_twin_row(toy_bench: Bench, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "twin.json"
    data = run_suite(toy_bench, out, sweeps=[], negation=False, specials=("twin",))
    row = json.loads(out.read_text())["merges"]["twin"]
    assert row == data["merges"]["twin"] and row["method"] == "twin"
    assert set(row["acc"]) == set(toy_bench.tasks) and 0 < row["normalized"] <= 2
    assert 0 <= row["router_test_accuracy"] <= 1
    assert set(row["seconds_per_batch"]) == {"static", "routed"}
    experts = [load_folder(toy_bench.built.experts[t].path) for t in toy_bench.tasks]
    expected = 0
    for name, t in load_folder(toy_bench.built.base).items():
        if not any(not torch.equal(e[name], t) for e in experts):
            continue  # stored only where an expert moved the tensor
        if t.ndim == 2:
            expected += math.ceil(0.1 * min(t.shape)) * sum(t.shape) * 4
        elif t.is_floating_point():
            expected += t.numel() * 4
    assert row["extra_bytes"] == len(toy_bench.tasks) * expected
    assert "| twin |" in out.with_suffix(".md").read_text()
