"""taskvec search: the search space, the strategies' bookkeeping, resume, failures, Ray workers.

The objective used here is written as a module in a temporary folder: the negative squared
distance of the merged tensors to θ* = θ₀ + 0.3 τ₀ + 0.7 τ₁, so every score has an independent
closed form (computed below with numpy from the checkpoints) and the optimum is known.
"""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli
from test_foundation_errors import one_error_line

from taskvec.errors import ConfigError
from taskvec.merge import merge_tensors
from taskvec.search import SearchSettings, run_search, search_space

OBJECTIVE_MODULE = """
import os
from pathlib import Path

import torch

TARGET = torch.load(os.environ["SEARCH_TARGET"])


def _count():
    with open(os.environ["SEARCH_CALLS"], "a") as f:
        f.write("call\\n")


def closeness(candidate):
    _count()
    return -sum(float(((candidate.tensors[k].double() - v) ** 2).sum()) for k, v in TARGET.items())


def split_closeness(candidate, split="validation"):
    return closeness(candidate) - (1.0 if split == "test" else 0.0)


def per_part(candidate):
    _count()
    names = sorted(TARGET)
    half = len(names) // 2
    part = lambda ns: -sum(
        float(((candidate.tensors[k].double() - TARGET[k]) ** 2).sum()) for k in ns
    )
    return {"first": part(names[:half]), "second": part(names[half:])}


per_part.metrics = ("first", "second")


def infinite(candidate):
    _count()
    return float("inf")


def flaky(candidate):
    value = closeness(candidate)
    if value < float(os.environ["SEARCH_FLAKY_BELOW"]):
        raise RuntimeError("this point is refused")
    return value
"""

OPTIMUM = (0.3, 0.7)


@pytest.fixture
def objective(llama: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The objective module on sys.path (and PYTHONPATH, for Ray workers); returns the file
    counting its calls."""
    folder = tmp_path / "objmod"
    folder.mkdir()
    (folder / "search_objective.py").write_text(OBJECTIVE_MODULE)
    base = load_folder(llama.base)
    fts = [load_folder(p) for p in llama.fts[:2]]
    target = {
        k: (
            base[k].double()
            + sum(
                w * (ft[k].double() - base[k].double()) for w, ft in zip(OPTIMUM, fts, strict=True)
            )
        )
        for k in base
        if base[k].is_floating_point()
    }
    torch.save(target, tmp_path / "target.pt")
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("SEARCH_TARGET", str(tmp_path / "target.pt"))
    monkeypatch.setenv("SEARCH_CALLS", str(calls))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("search_objective", None)
    return calls


def closeness(llama: Family, w: tuple[float, ...]) -> float:
    """The objective at weights ``w``, re-derived with numpy from the checkpoints."""
    base = {k: v.double().numpy() for k, v in load_folder(llama.base).items()}
    fts = [{k: v.double().numpy() for k, v in load_folder(p).items()} for p in llama.fts[:2]]
    total = 0.0
    for k, b in base.items():
        merged = b + sum(wi * (ft[k] - b) for wi, ft in zip(w, fts, strict=True))
        target = b + sum(wi * (ft[k] - b) for wi, ft in zip(OPTIMUM, fts, strict=True))
        total += float(((merged - target) ** 2).sum())
    return -total


def ta_config(llama: Family, path: Path, marker: dict | None = None, **extra: object) -> Path:
    marker = marker or {"search": [0.0, 1.0]}
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama.base),
        "models": [
            {"model": str(p), "parameters": {"weight": dict(marker)}} for p in llama.fts[:2]
        ],
        "dtype": "float32",
        **extra,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def search_cli(config: Path, out: Path, objective_spec: str, *args: str):
    """``taskvec search CONFIG -o OUT --objective OBJECTIVE ARGS...``."""
    return run_cli("search", config, "-o", out, "--objective", objective_spec, *args)


def settings(**kw: object) -> SearchSettings:
    kw.setdefault("objective", "search_objective:closeness")
    kw.setdefault("threads", 1)
    return SearchSettings(**kw)  # type: ignore[arg-type]


# --- the search space -------------------------------------------------------------------------


def test_markers_anywhere_become_named_dimensions():
    space = search_space(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [
                {"model": "/x/a", "parameters": {"weight": [{"search": [0, 1]}, 0.5]}},
                {"model": "/x/c", "parameters": {"density": {"search": [0.1, 0.9], "log": True}}},
            ],
            "parameters": {
                "lambda": {"search": [0.5, 1.5]},
                "k": {"search": [1, 3], "int": True},
                "normalize": {"search": {"choices": [True, False]}},
            },
        }
    )
    by_name = {d.name: d for d in space.dims}
    assert set(by_name) == {"a.weight[0]", "c.density", "lambda", "k", "normalize"}
    assert by_name["c.density"].log and by_name["k"].integer
    assert by_name["normalize"].choices == (True, False)
    config = space.resolve(
        {"a.weight[0]": 0.25, "c.density": 0.3, "lambda": 1.1, "k": 2, "normalize": False}
    )
    assert config["models"][0]["parameters"]["weight"] == [0.25, 0.5]
    assert config["models"][1]["parameters"]["density"] == 0.3
    assert config["parameters"] == {"lambda": 1.1, "k": 2, "normalize": False}
    low, high = space.corners()
    assert low["lambda"] == 0.5 and high["lambda"] == 1.5 and (low["k"], high["k"]) == (1, 3)


def test_simplex_weights_and_penalty():
    space = search_space(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}, {"model": "b"}, {"model": "c", "parameters": None}],
            "search": {"simplex": "weight", "l2": 0.1},
        }
    )
    u = {"simplex:a": 0.5, "simplex:b": 0.9, "simplex:c": 0.0}
    e = np.array([-math.log(0.5), -math.log(0.1), 0.0])
    want = e / e.sum()
    np.testing.assert_allclose(space.weights(u), want, rtol=1e-12)
    config = space.resolve(u)
    assert "search" not in config
    got = [m["parameters"]["weight"] for m in config["models"]]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert space.penalty(u) == pytest.approx(0.1 * float(np.linalg.norm(want)))


@pytest.mark.parametrize(
    ("marker", "needle"),
    [
        ({"search": [1.0, 1.0]}, "is empty"),
        ({"search": [1.0, 0.5]}, "is reversed"),
        ({"search": [0, "x"]}, "[low, high] numbers"),
        ({"search": [0.0, 1.0], "log": True}, "log range needs low > 0"),
        ({"search": [0.0, 1.0], "step": 2}, "unknown key"),
        ({"search": {"values": [1]}}, "choices"),
    ],
)
def test_bad_markers_are_one_line_before_any_trial(llama, tmp_path, marker, needle):
    config = ta_config(llama, tmp_path / "c.yaml", marker)
    res = search_cli(config, tmp_path / "out", "x:y")
    assert needle in one_error_line(res)
    assert not (tmp_path / "out").exists()


def test_nothing_to_search_is_refused():
    with pytest.raises(ConfigError, match="marks nothing to search"):
        search_space({"merge_method": "linear", "models": [{"model": "a"}]})


# --- checks before any trial ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective_spec", "needle"),
    [
        ("no_such_module_xyz:fn", "cannot import no_such_module_xyz"),
        ("search_objective:nothing", "has no function 'nothing'"),
        ("bench:nosuch", "unknown benchmark"),
        ("plain", "module:function"),
    ],
)
def test_objective_that_cannot_be_built_is_one_line(
    llama, tmp_path, objective, objective_spec, needle
):
    config = ta_config(llama, tmp_path / "c.yaml")
    res = search_cli(config, tmp_path / "out", objective_spec)
    assert needle in one_error_line(res)
    assert not (tmp_path / "out" / "study.db").exists()
    assert not objective.exists()  # no trial ran


def test_range_the_method_refuses_is_one_line_before_any_trial(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml", {"search": [0.2, 0.8]})
    cfg = yaml.safe_load(config.read_text())
    cfg["merge_method"] = "ties"
    cfg["parameters"] = {"density": {"search": [0.1, 1.5]}}
    config.write_text(yaml.safe_dump(cfg))
    res = search_cli(config, tmp_path / "out", "search_objective:closeness")
    line = one_error_line(res, "density")
    assert "high end" in line and "1.5" in line
    assert not objective.exists()


def test_unreachable_ray_address_is_one_line(llama, tmp_path, objective):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ta_config(llama, tmp_path / "c.yaml")
    res = search_cli(
        config,
        tmp_path / "out",
        "search_objective:closeness",
        "--address",
        f"127.0.0.1:{port}",
        "--trials",
        "2",
    )
    assert "cannot reach Ray" in one_error_line(res)
    assert not objective.exists()


# --- searching --------------------------------------------------------------------------------


def test_grid_scores_every_point_by_the_formula_and_best_yaml_reproduces_it(
    llama, tmp_path, objective
):
    config = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        config,
        tmp_path / "out",
        settings(strategy="grid", grid_points=3, trials=9),
        progress=False,
    )
    trials = report["trials"]
    assert len(trials) == 9 and report["completed"] == 9
    names = report["dimensions"]
    seen = set()
    for t in trials:
        w = tuple(t["params"][n] for n in names)
        seen.add(w)
        assert t["values"][0] == pytest.approx(closeness(llama, w), rel=1e-6, abs=1e-9)
    assert seen == {(a, b) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)}
    best_w = max(seen, key=lambda w: closeness(llama, w))
    assert tuple(report["best"]["values"][n] for n in names) == best_w
    assert report["best"]["test"] is None  # this objective has no held-out split

    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert [m["parameters"]["weight"] for m in best["models"]] == list(best_w)
    res = run_cli("merge", tmp_path / "out" / "best.yaml", tmp_path / "merged", "--no-progress")
    assert res.exit_code == 0, res.stderr
    saved = load_folder(tmp_path / "merged")
    in_memory = merge_tensors(tmp_path / "out" / "best.yaml").tensors
    assert set(saved) == set(in_memory)
    for k in saved:
        assert torch.equal(saved[k], in_memory[k]), k
    assert (tmp_path / "out" / "history.png").stat().st_size > 1000
    assert (tmp_path / "out" / "importance.png").stat().st_size > 1000


def test_cmaes_finds_the_optimum(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        config, tmp_path / "out", settings(strategy="cmaes", trials=40), progress=False
    )
    w = [report["best"]["values"][n] for n in report["dimensions"]]
    assert w == pytest.approx(list(OPTIMUM), abs=0.08)
    scores = [t["values"][0] for t in report["trials"]]
    assert max(scores) > np.median(scores)


def test_repeated_points_are_not_scored_again(llama, tmp_path, objective):
    cfg = ta_config(llama, tmp_path / "c.yaml", {"search": {"choices": [0.0, 1.0]}})
    report = run_search(
        cfg, tmp_path / "out", settings(strategy="random", trials=10), progress=False
    )
    assert report["completed"] == 10
    distinct = {json.dumps(t["params"], sort_keys=True) for t in report["trials"]}
    assert len(distinct) <= 4 and len(objective.read_text().splitlines()) == len(distinct)
    assert report["cached"] == 10 - len(distinct)


def test_grid_stops_when_covered(llama, tmp_path, objective):
    cfg = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        cfg, tmp_path / "out", settings(strategy="grid", grid_points=2, trials=8), progress=False
    )
    assert len(report["trials"]) == 4 and report["cached"] == 0


def test_a_failing_point_fails_its_trial_and_the_search_goes_on(
    llama, tmp_path, objective, monkeypatch
):
    config = ta_config(llama, tmp_path / "c.yaml")
    grid = [closeness(llama, (a, b)) for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)]
    monkeypatch.setenv("SEARCH_FLAKY_BELOW", str(float(np.median(grid))))  # half the points
    res = search_cli(
        config,
        tmp_path / "out",
        "search_objective:flaky",
        "--strategy",
        "grid",
        "--grid-points",
        "3",
        "--trials",
        "9",
        "--no-progress",
        "--threads",
        "1",
    )
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failed = [t for t in report["trials"] if t["state"] == "fail"]
    assert len(failed) == 4 and report["completed"] == 5
    assert all("this point is refused" in t["error"] for t in failed)
    assert "failed: RuntimeError: this point is refused" in res.stdout


def test_resume_continues_the_study(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    first = run_search(config, tmp_path / "out", settings(trials=3), progress=False)
    again = search_cli(config, tmp_path / "out", "search_objective:closeness")
    assert "--resume continues it" in one_error_line(again)
    other = search_cli(config, tmp_path / "out", "search_objective:flaky", "--resume")
    assert "different objective" in one_error_line(other)
    resumed = run_search(config, tmp_path / "out", settings(trials=5, resume=True), progress=False)
    assert len(resumed["trials"]) == 5
    assert [t["params"] for t in resumed["trials"][:3]] == [t["params"] for t in first["trials"]]


def test_per_task_gives_a_pareto_front(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        config,
        tmp_path / "out",
        settings(objective="search_objective:per_part", strategy="nsga2", per_task=True, trials=12),
        progress=False,
    )
    best = report["best"]["validation"]["metrics"]
    assert set(best) == {"first", "second"}
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000
    complete = [t for t in report["trials"] if t["state"] == "complete"]
    best_values = [best["first"], best["second"]]
    assert not any(  # no trial dominates the chosen point
        all(a >= b for a, b in zip(t["values"], best_values, strict=True))
        and any(a > b for a, b in zip(t["values"], best_values, strict=True))
        for t in complete
    )


def test_simplex_search_writes_weights_on_the_simplex(llama, tmp_path, objective):
    config = {
        "merge_method": "linear",
        "models": [{"model": str(p)} for p in [llama.base, *llama.fts[:2]]],
        "dtype": "float32",
        "search": {"simplex": "weight", "l2": 0.5},
    }
    report = run_search(config, tmp_path / "out", settings(trials=6), progress=False)
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    weights = [m["parameters"]["weight"] for m in best["models"]]
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
    for t in report["trials"]:  # J = score − l2·‖α‖
        penalty = 0.5 * float(np.linalg.norm(t["weights"]))
        assert t["values"][0] == pytest.approx(t["score"] - penalty)


def test_held_out_split_is_scored_once_for_the_best(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        config,
        tmp_path / "out",
        settings(objective="search_objective:split_closeness", trials=3),
        progress=False,
    )
    assert report["best"]["test"]["score"] == pytest.approx(
        report["best"]["validation"]["score"] - 1.0
    )


def test_two_ray_workers(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    report = run_search(
        config,
        tmp_path / "out",
        settings(strategy="random", trials=4, workers=2),
        progress=False,
    )
    assert report["completed"] == 4
    for t in report["trials"]:
        w = tuple(t["params"][n] for n in report["dimensions"])
        assert t["values"][0] == pytest.approx(closeness(llama, w), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_in_memory_merge_is_the_saved_merge(llama, tmp_path, method):
    config = {
        "merge_method": method,
        "base_model": str(llama.base),
        "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in llama.fts],
        "parameters": {"density": 0.5} if method != "task_arithmetic" else {},
        "dtype": "float32",
    }
    res = run_cli("merge", _dump(config, tmp_path), tmp_path / "m", "--random-seed", "3")
    assert res.exit_code == 0, res.stderr
    saved = load_folder(tmp_path / "m")
    merged = merge_tensors(config, random_seed=3)
    assert merged.reference == llama.base
    assert set(saved) == set(merged.tensors)
    for k, v in saved.items():
        assert torch.equal(v, merged.tensors[k]), k


def _dump(config: dict, folder: Path) -> Path:
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- the gradient strategy --------------------------------------------------------------------


def _simplex_by_bisection(v: np.ndarray) -> np.ndarray:
    """argmin ‖w − v‖ on the simplex: w = max(v − t, 0) with Σ w = 1, t found by bisection."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        t = (lo + hi) / 2
        lo, hi = (t, hi) if np.maximum(v - t, 0).sum() > 1 else (lo, t)
    return np.maximum(v - (lo + hi) / 2, 0)


def test_simplex_projection_matches_bisection():
    from taskvec.search.gradient import project_simplex

    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(size=(int(rng.integers(1, 7)), 3)) * rng.uniform(0.1, 3)
        got = project_simplex(torch.tensor(v)).numpy()
        want = np.stack([_simplex_by_bisection(v[:, j]) for j in range(v.shape[1])], axis=1)
        np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.mark.parametrize(
    ("objective_spec", "needle"),
    [("search_objective:closeness", "differentiable objective")],
)
def test_gradient_needs_a_differentiable_objective(
    llama, tmp_path, objective, objective_spec, needle
):
    config = ta_config(llama, tmp_path / "c.yaml")
    res = search_cli(config, tmp_path / "out", objective_spec, "--strategy", "gradient")
    assert needle in one_error_line(res)
    assert not objective.exists()


def test_a_non_finite_score_fails_its_trial(llama, tmp_path, objective):
    config = ta_config(llama, tmp_path / "c.yaml")
    res = search_cli(
        config,
        tmp_path / "out",
        "search_objective:infinite",
        "--strategy",
        "grid",
        "--grid-points",
        "2",
        "--no-progress",
        "--threads",
        "1",
    )
    assert "no trial completed" in one_error_line(res)
    assert "returned inf, not a finite number" in res.stdout
    assert not (tmp_path / "out" / "best.yaml").exists()


def test_simplex_over_a_fixed_weight_is_refused():
    with pytest.raises(ConfigError, match=r"b\.weight is set in the config"):
        search_space(
            {
                "merge_method": "linear",
                "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}],
                "search": {"simplex": "weight"},
            }
        )


def test_a_candidate_missing_a_parameter_of_its_model_is_refused(bert):
    from taskvec.search.objectives import Candidate, ObjectiveError

    tensors = load_folder(bert.base)
    dropped = sorted(k for k in tensors if k.endswith("weight"))[0]
    complete = Candidate(dict(tensors), bert.base).load("base")
    own = dict(complete.named_parameters())
    name = next(n for n in own if n.endswith(dropped) or dropped.endswith(n))
    torch.testing.assert_close(own[name].detach(), tensors[dropped], rtol=0, atol=0)
    del tensors[dropped]
    with pytest.raises(ObjectiveError, match="the merge has no tensor of shape"):
        Candidate(tensors, bert.base).load("base")
