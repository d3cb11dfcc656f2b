"""Whole-model pipeline methods: one registry with the per-tensor methods, YAML, ``--dry-run``
and ``taskvec methods`` for both kinds; EMR from a merge config; no merge <-> fda import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import Family, load_folder, run_cli, tree_digest
from test_foundation_errors import one_error_line

from taskvec.config import MergeConfig
from taskvec.errors import ConfigError
from taskvec.io.checkpoint import open_checkpoint
from taskvec.io.writer import CheckpointWriter, planned
from taskvec.merge import merge, plan_merge
from taskvec.methods import PipelineMethod, all_methods, get_method
from taskvec.methods.params import Param
from taskvec.methods.registry import _REGISTRY, register_method

SRC = Path(__file__).resolve().parents[1] / "src" / "taskvec"


def _config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _emr_config(family: Family, tmp_path: Path, **extra: Any) -> Path:
    cfg = {
        "merge_method": "emr",
        "base_model": str(family.base),
        "models": [{"model": str(p)} for p in family.fts],
        **extra,
    }
    return _config(tmp_path / "emr.yaml", cfg)


# --- one registry, cheap registration, no import cycle --------------------------------------


def test_fda_and_emr_are_registered_next_to_the_per_tensor_methods() -> None:
    for name in ("fda", "emr"):
        m = get_method(name)
        assert isinstance(m, PipelineMethod) and all_methods()[name] is m
        assert m.formula and m.reference and m.output
    listed = run_cli("methods")
    assert listed.exit_code == 0
    rows = {line.split()[0] for line in listed.output.splitlines()}
    assert {"fda", "emr", "ties"} <= rows
    reference = run_cli("methods", "--markdown").output
    assert "## `emr`" in reference and "`anchors` (64; a whole number in [1, inf))" in reference


def test_fda_declares_the_defaults_of_its_settings() -> None:
    from taskvec.fda.adapt import AdaptSettings
    from taskvec.fda.anchors import AnchorSettings

    declared = get_method("fda").params
    for settings, rename in ((AnchorSettings(), {}), (AdaptSettings(), {"lr": "adapt_lr"})):
        for f in fields(settings):
            key = rename.get(f.name, f.name)
            if key in declared:
                assert declared[key].default == getattr(settings, f.name), key
    assert set(f.name for f in fields(AnchorSettings)) <= set(declared)


def _module_imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported anywhere) by the file ``path``."""
    tree = ast.parse(path.read_text())

    def names(nodes: Any) -> set[str]:
        out: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return out

    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    top += [  # `if TYPE_CHECKING:` blocks do not run, and are left out
        n
        for block in tree.body
        if isinstance(block, ast.Try | ast.With)
        for n in block.body
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    return names(top), names(ast.walk(tree))


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_merge_and_fda_do_not_import_each_other() -> None:
    _, merge_imports = _module_imports(SRC / "merge.py")
    assert not [m for m in merge_imports if _is(m, "taskvec.fda") or _is(m, "taskvec.emr")]
    for path in sorted((SRC / "fda").glob("*.py")):
        top, _ = _module_imports(path)
        assert not [m for m in top if _is(m, "taskvec.merge")], path.name
    for name in ("fda", "emr"):  # the registrations import their method only when it is used
        top, _ = _module_imports(SRC / "methods" / f"{name}.py")
        assert not [m for m in top if _is(m, f"taskvec.{name}")], name


def test_the_fda_library_does_not_import_the_benchmark() -> None:
    """bench builds on fda, never the reverse; only the ``taskvec fda`` command's glue reads
    the benchmark's models and data."""
    for path in sorted((SRC / "fda").glob("*.py")):
        if path.name == "cli.py":
            continue
        _, everywhere = _module_imports(path)
        assert not [m for m in everywhere if _is(m, "taskvec.bench")], path.name


def test_registering_every_method_stays_cheap() -> None:
    code = (
        "import sys, taskvec.methods, taskvec.merge\n"
        "heavy = ('taskvec.fda', 'taskvec.emr', 'transformers')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- EMR from a merge config ----------------------------------------------------------------


def _emr_expected(family: Family, task: int) -> dict[str, torch.Tensor]:
    """Task ``task``'s model, re-derived from the paper's formulas on the whole state dicts."""
    base = family.base_sd
    taus = {
        n: torch.stack([sd[n].double() - v.double() for sd in family.ft_sds])
        for n, v in base.items()
    }
    abs_sum = torch.zeros(len(family.ft_sds), dtype=torch.float64)
    kept_sum = torch.zeros_like(abs_sum)
    uni, masks = {}, {}
    for n, tau in taus.items():
        gamma = torch.where(tau.sum(0) > 0, 1.0, -1.0).double()
        masks[n] = tau * gamma > 0
        uni[n] = gamma * (tau.abs() * masks[n]).amax(0)
        abs_sum += tau.abs().flatten(1).sum(1)
        kept_sum += (masks[n] * uni[n].abs()).flatten(1).sum(1)
    scale = abs_sum / kept_sum
    return {n: base[n].double() + scale[task] * masks[n][task] * uni[n] for n in base}


def test_emr_config_writes_the_folder_of_taskvec_emr(llama: Family, tmp_path: Path) -> None:
    config = _emr_config(llama, tmp_path)
    dry = run_cli("merge", config, tmp_path / "yaml", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "plan: emr" in dry.output and "tasks: " in dry.output
    assert not (tmp_path / "yaml").exists()
    done = run_cli("merge", config, tmp_path / "yaml", "--no-progress")
    assert done.exit_code == 0, done.output
    assert "EMR folder" in done.output
    cli = run_cli("emr", llama.base, *llama.fts, "-o", tmp_path / "cli", "--no-progress")
    assert cli.exit_code == 0, cli.output
    assert load_folder(tmp_path / "yaml").keys() == load_folder(tmp_path / "cli").keys()
    for name, value in load_folder(tmp_path / "yaml").items():
        assert torch.equal(value, load_folder(tmp_path / "cli")[name]), name
    info = json.loads((tmp_path / "yaml" / "emr.json").read_text())
    assert info == json.loads((tmp_path / "cli" / "emr.json").read_text())
    assert info["tasks"] == [p.name for p in llama.fts]
    assert open_checkpoint(tmp_path / "yaml").metadata["taskvec.kind"] == "emr"
    for i, task in enumerate(info["tasks"]):
        out = tmp_path / f"task-{task}"
        made = run_cli("emr-task", tmp_path / "yaml", task, llama.base, "-o", out, "--no-progress")
        assert made.exit_code == 0, made.output
        expected = _emr_expected(llama, i)
        for name, value in load_folder(out).items():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6)


def test_emr_config_relative_to_the_config_folder(llama: Family, tmp_path: Path) -> None:
    cfg = {
        "merge_method": "emr",
        "base_model": "base",
        "models": [{"model": p.name} for p in llama.fts],
    }
    for p in (llama.base, *llama.fts):
        (tmp_path / p.name).symlink_to(p)
    if llama.base.name != "base":
        (tmp_path / "base").symlink_to(llama.base)
    plan = merge(_config(tmp_path / "emr.yaml", cfg), tmp_path / "out", dry_run=True)
    assert plan.problems == [] and plan.method is get_method("emr")
    assert plan.plan.base == str(tmp_path / "base")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"parameters": {"lambda": 1.0}}, "unknown emr parameter 'lambda'"),
        ({"dtype": "float16"}, "drop dtype/out_dtype"),
        ({"models": "one"}, "needs at least 2 models"),
        ({"models": "per-model"}, "not per model"),
        ({"base_model": None}, "needs a base_model and a models list"),
    ],
)
def test_bad_emr_configs_fail_in_one_line(
    llama: Family, tmp_path: Path, extra: dict[str, Any], needle: str
) -> None:
    models = extra.pop("models", None)
    config = _emr_config(llama, tmp_path, **extra)
    cfg = yaml.safe_load(config.read_text())
    if models == "one":
        cfg["models"] = cfg["models"][:1]
    elif models == "per-model":
        cfg["models"][0]["parameters"] = {"weight": 1.0}
    _config(config, cfg)
    before = tree_digest(llama.root)
    one_error_line(run_cli("merge", config, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() and tree_digest(llama.root) == before


def test_emr_dry_run_reports_problems_and_resume_is_refused(
    llama: Family, bert: Family, tmp_path: Path
) -> None:
    mixed = {
        "merge_method": "emr",
        "base_model": str(llama.base),
        "models": [{"model": str(llama.fts[0])}, {"model": str(bert.fts[1])}],
    }
    dry = run_cli("merge", _config(tmp_path / "mixed.yaml", mixed), tmp_path / "o", "--dry-run")
    assert dry.exit_code == 1 and "problem(s) would stop this merge" in dry.stderr
    (tmp_path / "taken").mkdir()
    taken = run_cli("merge", _emr_config(llama, tmp_path), tmp_path / "taken")
    one_error_line(taken, "exists")
    resumed = run_cli("merge", _emr_config(llama, tmp_path), tmp_path / "r", "--resume")
    one_error_line(resumed, "merge_method emr cannot be resumed")
    before = tree_digest(llama.root)
    onto = run_cli("merge", _emr_config(llama, tmp_path), llama.fts[0], "--overwrite")
    one_error_line(onto, "the output would replace the input")
    assert tree_digest(llama.root) == before
    with pytest.raises(ConfigError, match="emr is a whole-model pipeline method: use merge"):
        plan_merge(_emr_config(llama, tmp_path))


def test_fda_parameters_are_checked_against_their_declared_ranges(
    bert: Family, tmp_path: Path
) -> None:
    cfg = {
        "merge_method": "fda",
        "base_model": str(bert.base),
        "models": [{"model": str(p)} for p in bert.fts],
    }
    for params, needle in (
        ({"sigma": -1.0}, "fda: sigma = -1.0 is out of range (0, inf)"),
        ({"anchors": 2.5}, "fda: anchors = 2.5 is not a whole number (range [1, inf))"),
        ({"start": 3}, "fda: start = 3 is not a string"),
    ):
        config = _config(tmp_path / "fda.yaml", {**cfg, "parameters": params})
        line = one_error_line(run_cli("merge", config, tmp_path / "out", "--dry-run"), needle)
        assert line == f"taskvec: error: {needle}"
    resumed = run_cli("merge", config, tmp_path / "out", "--resume")
    one_error_line(resumed, "merge_method fda cannot be resumed")


# --- a pipeline method of one's own ---------------------------------------------------------


@dataclass
class _MeanPlan:
    models: list[str]
    scale: float
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"models: {len(self.models)}, scale {self.scale:g}"]


def _mean_plan(cfg: MergeConfig, config_dir: Path | None, seed: int | None) -> _MeanPlan:
    method = get_method("_mean_pipeline")
    assert isinstance(method, PipelineMethod)
    base, experts = method.inputs(cfg, config_dir)
    params = method.checked(method.given(cfg.parameters), len(experts))
    return _MeanPlan(list(experts.values()), params.get("scale", 1.0))


def _mean_run(plan: _MeanPlan, out: Path, *, overwrite: bool, **_: Any) -> Path:
    sds = [load_folder(Path(m)) for m in plan.models]
    names = list(sds[0])
    items = [(n, tuple(sds[0][n].shape), sds[0][n].dtype) for n in names]
    with CheckpointWriter(out, planned(items), overwrite=overwrite) as writer:
        for n in names:
            writer.write(n, plan.scale * sum(sd[n] for sd in sds) / len(sds))
        return writer.commit()


@pytest.fixture
def mean_pipeline() -> Iterator[PipelineMethod]:
    method = PipelineMethod(
        "_mean_pipeline",
        "θ = s · mean θᵢ",
        _mean_plan,
        _mean_run,
        output="the scaled mean",
        params={"scale": Param(1.0, "(0, inf)")},
    )
    register_method(method)
    yield method
    del _REGISTRY[method.name]


def test_merge_runs_any_registered_pipeline_method(
    llama: Family, tmp_path: Path, mean_pipeline: PipelineMethod
) -> None:
    cfg = {
        "merge_method": mean_pipeline.name,
        "base_model": str(llama.base),
        "models": [{"model": str(p)} for p in llama.fts],
        "parameters": {"scale": 0.5},
    }
    config = _config(tmp_path / "mean.yaml", cfg)
    dry = run_cli("merge", config, tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0 and "models: 3, scale 0.5" in dry.output
    done = run_cli("merge", config, tmp_path / "out", "--no-progress")
    assert done.exit_code == 0 and "wrote the scaled mean with _mean_pipeline" in done.output
    for name, value in load_folder(tmp_path / "out").items():
        expected = 0.5 * sum(sd[name].double() for sd in llama.ft_sds) / 3
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    one_error_line(
        run_cli("merge", _config(config, {**cfg, "parameters": {"scale": 0}}), tmp_path / "x"),
        "_mean_pipeline: scale = 0 is out of range (0, inf)",
    )
    with pytest.raises(ValueError, match="registered twice"):
        register_method(mean_pipeline)
