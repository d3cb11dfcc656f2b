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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from taskvec.config import MergeConfig
from taskvec.errors import ConfigError, TaskvecError
from taskvec.fda.adapt import AdaptSettings
from taskvec.fda.anchors import AnchorSettings
from taskvec.io.durable import make_parents

METHOD = "fda"
_ANCHOR_KEYS = {f.name for f in fields(AnchorSettings)} - {"snapshots"}
_ADAPT_KEYS = {"loss", "adapt_lr", "coef_lr", "epochs", "batch"}
_OTHER_KEYS = {"start", "scaling", "anchor_dir", "snapshots"}


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


def parse_fda(
    cfg: MergeConfig, config_dir: Path | None = None, seed: int | None = None
) -> FdaMerge:
    """Check an FDA config's keys and values (no weights are read); relative model paths
    that do not exist from here are taken relative to ``config_dir``."""
    if cfg.base_model is None or not cfg.models:
        raise ConfigError("merge_method fda needs a base_model and a models list")
    if cfg.dtype or cfg.out_dtype:  # not silently ignored
        raise ConfigError("merge_method fda writes the base model's dtypes; drop dtype/out_dtype")
    params: dict[str, Any] = dict(cfg.parameters)
    unknown = set(params) - _ANCHOR_KEYS - _ADAPT_KEYS - _OTHER_KEYS
    if unknown:
        raise ConfigError(f"unknown fda parameter {sorted(unknown)[0]!r}")
    for key, value in params.items():
        if isinstance(value, list):
            raise ConfigError(f"fda parameter {key!r} takes one value, not a list")
    names = [Path(m.model).name for m in cfg.models]
    where = _relative_to(config_dir)
    if len(set(names)) != len(names):
        raise ConfigError("fda names each task after its model folder; two folders share a name")
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
    scaling = params.get("scaling")
    return FdaMerge(
        where(cfg.base_model),
        dict(zip(names, [where(m.model) for m in cfg.models], strict=True)),
        anchors,
        adapt,
        str(params.get("start", "base")),
        None if scaling is None else float(scaling),
        None if params.get("anchor_dir") is None else str(params["anchor_dir"]),
    )


def run_fda(
    plan: FdaMerge,
    out: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> FdaMerge:
    """Validate the models (headers only), then, unless ``dry_run``, run FDA into ``out``."""
    from taskvec import methods
    from taskvec.fda.pipeline import FDA, Start
    from taskvec.merge import merge

    try:
        runner = FDA(plan.base, plan.experts, device)
        method = methods.all_methods().get(plan.start)
        start = None if method is not None else Start.parse(plan.start, plan.scaling)
    except TaskvecError as e:
        plan.problems.append(str(e))
        return plan
    if dry_run:
        return plan
    out = Path(out).expanduser().absolute()
    make_parents(out)  # for the work folder; the output's writer would make them anyway
    work = Path(tempfile.mkdtemp(prefix=".taskvec-fda-start-", dir=out.parent))
    try:
        if start is None:
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
    return plan


def _relative_to(config_dir: Path | None) -> Any:
    def where(ref: str) -> str:
        path = Path(ref).expanduser()
        if path.exists() or config_dir is None or path.is_absolute():
            return str(path)
        return str(config_dir / path)

    return where
