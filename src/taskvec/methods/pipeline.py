"""Whole-model pipeline methods: merges that are not one pure function per tensor.

A per-tensor method (:mod:`taskvec.methods.registry`) sees one parameter of every model at a
time. A pipeline method works on whole models (forward passes on data, a decomposition written
as a folder of its own). It is registered in the same registry, so ``merge_method:`` in a YAML
config, ``--dry-run`` and ``taskvec methods`` treat it like any other::

    register_method(PipelineMethod(
        "emr", doc=..., reference=..., output="an EMR folder",
        params={...},                      # each a Param, checked as for every method
        plan=plan_emr,                     # (cfg, config_dir, seed) -> PipelinePlan
        run=run_emr,                       # (plan, out, *, overwrite, threads, progress,
    ))                                     #  device) -> the output folder

(see :mod:`taskvec.methods.fda` and :mod:`taskvec.methods.emr`). The plan checks its inputs
and parameters with :meth:`PipelineMethod.inputs`, :meth:`~PipelineMethod.given` and
:meth:`~PipelineMethod.checked`.

* ``plan`` reads headers and config files only: a bad config raises a one-line
  :class:`~taskvec.errors.ConfigError`, anything else wrong goes into the plan's ``problems``;
  ``lines()`` is what ``--dry-run`` prints;
* :func:`taskvec.merge.merge` checks the output path; unless it is a dry run and only without
  problems it calls ``run``, which writes ``out`` through
  :class:`~taskvec.io.writer.CheckpointWriter`.

``plan`` and ``run`` import what they need (torch.func, transformers) when called, so that
registering a pipeline method stays cheap. A pipeline method takes one value per parameter
(no per-tensor gradients or filters) and names each task after its model's folder.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from taskvec.config import MergeConfig, ParameterValue
from taskvec.errors import ConfigError, TaskvecError
from taskvec.methods.params import Param
from taskvec.methods.registry import BaseUse


class PipelinePlan(Protocol):
    """What a pipeline method's ``plan`` returns: its problems and its ``--dry-run`` lines."""

    problems: list[str]

    def lines(self) -> list[str]: ...


PlanFn = Callable[[MergeConfig, Path | None, int | None], PipelinePlan]
RunFn = Callable[..., Path]


@dataclass(frozen=True)
class PipelineMethod:
    """A registered whole-model method (see the module docstring); ``doc``'s first line is its
    formula, ``output`` says what ``run`` writes."""

    name: str
    doc: str
    plan: PlanFn
    run: RunFn
    output: str
    reference: str = ""
    params: dict[str, Param] = field(default_factory=dict)
    base: BaseUse = "required"
    min_models: int = 1
    uses_data: bool = False  # each model names its data (`data:`), on which the method runs it

    @property
    def formula(self) -> str:
        return self.doc.strip().splitlines()[0]

    @property
    def per_model(self) -> dict[str, Any]:
        """None: a pipeline method's parameters are the whole merge's."""
        return {}

    @property
    def globals(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def inputs(self, cfg: MergeConfig, config_dir: Path | None) -> tuple[str, dict[str, str]]:
        """The base model and the task models by name (their folders' names); a relative path
        that does not exist from here is taken relative to ``config_dir``."""
        name = self.name
        if self.base == "unused" and cfg.base_model is not None:
            raise ConfigError(f"merge_method {name} uses no base model: drop base_model")
        if (cfg.base_model is None and self.base != "unused") or not cfg.models:
            raise ConfigError(f"merge_method {name} needs a base_model and a models list")
        if cfg.dtype or cfg.out_dtype:  # not silently ignored
            raise ConfigError(
                f"merge_method {name} writes the base model's dtypes; drop dtype/out_dtype"
            )
        if any(m.parameters or m.statistics for m in cfg.models):
            raise ConfigError(
                f"merge_method {name} takes its parameters at the top level, not per model"
            )
        for m in cfg.models:
            if (m.data is None) == self.uses_data:
                need = "needs `data:` for" if self.uses_data else "runs no data: drop `data:` of"
                raise ConfigError(f"merge_method {name} {need} model {m.model!r}")
        if len(cfg.models) < self.min_models:
            raise ConfigError(f"merge_method {name} needs at least {self.min_models} models")
        names = [Path(m.model).name for m in cfg.models]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"{name} names each task after its model folder; two folders share a name"
            )

        where = _relative_to(config_dir)
        return where(cfg.base_model or ""), {
            n: where(m.model) for n, m in zip(names, cfg.models, strict=True)
        }

    def data(self, cfg: MergeConfig, config_dir: Path | None) -> dict[str, str]:
        """Each task's data source (its model's `data:`, a path relative to the config as a
        model's is; a `module:function` stays as written), by task name."""
        where = _relative_to(config_dir)
        return {
            Path(m.model).name: m.data if _is_callable(m.data) else where(m.data)
            for m in cfg.models or []
            if m.data is not None
        }

    def given(self, parameters: Mapping[str, ParameterValue]) -> dict[str, Any]:
        """The config's parameters, each a declared one with a single value (not yet checked
        against its valid values: see :meth:`checked`)."""
        for key, value in parameters.items():
            if key not in self.params:
                hint = difflib.get_close_matches(key, list(self.params), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"unknown {self.name} parameter {key!r}{suggestion}")
            if isinstance(value, list):
                raise ConfigError(f"{self.name} parameter {key!r} takes one value, not a list")
        return dict(parameters)

    def checked(self, given: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """``given`` checked against the declared valid values (whole numbers as ``int``)."""
        out: dict[str, Any] = {}
        for key, value in given.items():
            p = self.params[key]
            try:
                x = p.check(key, value, n_models)
            except ConfigError as e:
                raise ConfigError(f"{self.name}: {e}") from None
            out[key] = int(x) if p.kind == "number" and p.integer else x
        return out


@dataclass
class DataPlan:
    """A validated config of a pipeline method that runs its models on each task's data."""

    base: str
    experts: dict[str, str]
    data: dict[str, str]
    options: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"base: {self.base}",
            *(f"task {t}: {self.experts[t]} on {self.data[t]}" for t in self.experts),
            "settings: " + ", ".join(f"{k}={v}" for k, v in self.options.items()),
        ]


def plan_with_data(
    method: PipelineMethod,
    cfg: MergeConfig,
    config_dir: Path | None,
    expert_problem: Callable[[str, dict[str, Any]], str | None] = lambda *_: None,
) -> DataPlan:
    """The plan of a method with ``uses_data``: its inputs, its parameters (defaults filled
    in), every model's config read and each data source's first example read, from headers
    and files only; ``expert_problem(folder, config)`` adds a method's own check of an
    expert."""
    from taskvec.data import open_data
    from taskvec.forward import model_config

    base, experts = method.inputs(cfg, config_dir)
    options = {k: p.default for k, p in method.params.items()}
    options |= method.checked(method.given(cfg.parameters), len(experts))
    plan = DataPlan(base, experts, method.data(cfg, config_dir), options)
    for is_expert, folder in ((False, base), *((True, f) for f in experts.values())):
        try:
            config = model_config(folder)
        except TaskvecError as e:
            plan.problems.append(str(e))
            continue
        if is_expert and (problem := expert_problem(folder, config)) is not None:
            plan.problems.append(problem)
    for task, source in plan.data.items():
        try:
            open_data(source).examples(1)
        except TaskvecError as e:
            plan.problems.append(f"task {task}: {e}")
    return plan


def _relative_to(config_dir: Path | None) -> Callable[[str], str]:
    """A path as written when it exists from here, else relative to ``config_dir``."""

    def where(ref: str) -> str:
        path = Path(ref).expanduser()
        if path.exists() or config_dir is None or path.is_absolute():
            return str(path)
        return str(config_dir / path)

    return where


def _is_callable(source: str) -> bool:
    """``module:function`` (not ``file.jsonl:column``, whose part before ``:`` has a suffix)."""
    head, sep, _ = source.partition(":")
    return bool(sep) and not Path(head).suffix and not Path(head).exists()


@dataclass
class PipelineMerge:
    """A pipeline method's plan, as :func:`taskvec.merge.merge` returns it."""

    method: PipelineMethod
    plan: PipelinePlan

    @property
    def problems(self) -> list[str]:
        return self.plan.problems

    def lines(self) -> list[str]:
        return self.plan.lines()
