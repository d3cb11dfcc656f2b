"""``merge_method: fda`` in a merge config: the whole FDA method behind ``taskvec merge``.

    merge_method: fda
    base_model: ./minilm
    models:
      - model: ./expert-mr            # the task's name is the folder's name
      - model: ./expert-spam
    parameters:
      init: gauss                     # or weight
      anchors: 64                     # per task and block
      steps: 200                      # construction steps per block
      start: base                     # base, task_arithmetic, a method (tsv, wudi...), a folder
      scaling: 0.3                    # initial coefficient when start is not base
      epochs: 125                     # adaptation epochs
      anchor_dir: ./anchors           # optional: keep (and reuse) the anchors here

Every key of :class:`~taskvec.fda.anchors.AnchorSettings` and
:class:`~taskvec.fda.adapt.AdaptSettings` is accepted (``lr`` is the construction's, ``adapt_lr``
the adaptation's). A method name as ``start`` merges the experts with that method (its defaults)
first and adapts the coefficient of the merged task vector.

:mod:`taskvec.methods.fda` registers the method (its declared parameters, checked as every
method's); :func:`plan_fda` and :func:`run_fda` are its plan and run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from taskvec.config import MergeConfig
from taskvec.errors import ConfigError, TaskvecError
from taskvec.fda.adapt import AdaptSettings
from taskvec.fda.anchors import AnchorSettings
from taskvec.io.durable import make_parents

if TYPE_CHECKING:
    from taskvec.methods.registry import MergeMethod

_ANCHOR_KEYS = {f.name for f in fields(AnchorSettings)} - {"snapshots"}
_ADAPT_KEYS = {"loss", "adapt_lr", "coef_lr", "epochs", "batch"}


@dataclass
class FdaMerge:
    """A validated ``merge_method: fda`` config (what ``--dry-run`` reports)."""

    base: str
    experts: dict[str, str]
    anchors: AnchorSettings
    adapt: AdaptSettings
    start: str
    scaling: float | None
    anchor_dir: str | None
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"base: {self.base}",
            f"experts: {', '.join(f'{k}={v}' for k, v in self.experts.items())}",
            f"anchors: {self.anchors}",
            f"adaptation: {self.adapt}, start: {self.start}",
        ]


def plan_fda(cfg: MergeConfig, config_dir: Path | None = None, seed: int | None = None) -> FdaMerge:
    """Check an FDA config's keys and values, then the models' headers (no weights are read);
    relative model paths that do not exist from here are taken relative to ``config_dir``."""
    from taskvec.methods.fda import FDA as METHOD

    base, experts = METHOD.inputs(cfg, config_dir)
    given = METHOD.given(cfg.parameters)
    _settings(given, seed)  # the settings' own messages first (`taskvec fda` shares them)
    params = METHOD.checked(given, len(experts))
    anchors, adapt = _settings(params, seed)
    scaling = params.get("scaling")
    plan = FdaMerge(
        base,
        experts,
        anchors,
        adapt,
        str(params.get("start", "base")),
        None if scaling is None else float(scaling),
        params.get("anchor_dir"),
    )
    try:
        from taskvec.fda.pipeline import FDA, Start

        FDA(plan.base, plan.experts)  # the models' headers
        if _start_method(plan.start) is None:
            Start.parse(plan.start, plan.scaling)
    except TaskvecError as e:
        plan.problems.append(str(e))
    return plan


def _settings(params: dict[str, Any], seed: int | None) -> tuple[AnchorSettings, AdaptSettings]:
    """The construction and adaptation settings the parameters give (``seed``: the merge's
    ``--random-seed``, unless the parameters name one)."""
    try:
        anchors = AnchorSettings(
            **{k: params[k] for k in _ANCHOR_KEYS if k in params},
            snapshots=int(params.get("snapshots", 0)),
            **({"seed": seed} if seed is not None and "seed" not in params else {}),
        )
        adapt = AdaptSettings(
            **{k: params[k] for k in _ADAPT_KEYS - {"adapt_lr"} if k in params},
            **({"lr": params["adapt_lr"]} if "adapt_lr" in params else {}),
        )
    except TaskvecError as e:
        raise ConfigError(f"fda: {e}") from None
    except TypeError as e:
        raise ConfigError(f"fda: bad parameter ({e})") from None
    return anchors, adapt


def _start_method(start: str) -> MergeMethod | None:
    """The per-tensor method ``start`` names, if it names one."""
    from taskvec.methods import MergeMethod, all_methods

    method = all_methods().get(start)
    if method is not None and not isinstance(method, MergeMethod):
        raise ConfigError(f"FDA start {start!r} is a whole-model method, not a per-tensor one")
    return method


def run_fda(
    plan: FdaMerge,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """Run the FDA merge ``plan`` into ``out`` (a start given as a method name is merged into a
    work folder first, then removed)."""
    from taskvec.fda.pipeline import FDA, Start
    from taskvec.merge import merge  # fda builds on merge, never the other way round

    runner = FDA(plan.base, plan.experts, device)
    method = _start_method(plan.start)
    out = Path(out).expanduser().absolute()
    make_parents(out)  # for the work folder; the output's writer would make them anyway
    work = Path(tempfile.mkdtemp(prefix=".taskvec-fda-start-", dir=out.parent))
    try:
        if method is None:
            start = Start.parse(plan.start, plan.scaling)
        else:
            merged = work / "start"
            weight = {"parameters": {"weight": 1.0}} if "weight" in method.per_model else {}
            config = {
                "merge_method": plan.start,
                "base_model": plan.base,
                "models": [{"model": m} | weight for m in plan.experts.values()],
            }
            merge(config, merged, threads=threads, progress=progress)
            start = Start("model", 1.0 if plan.scaling is None else plan.scaling, merged)
        runner.merge(
            out,
            plan.anchors,
            plan.adapt,
            start,
            anchors=plan.anchor_dir,
            overwrite=overwrite,
            threads=threads,
            progress=progress,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
