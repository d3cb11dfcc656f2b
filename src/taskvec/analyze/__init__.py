"""``taskvec analyze``: what a set of task vectors looks like and whether they will merge well.

>>> import taskvec.analyze as tva
>>> result = tva.analyze("base", ["ft_math", "ft_code"], out="report")   # doctest: +SKIP
>>> result["pairwise"]["cosine"]                                        # doctest: +SKIP

Two streamed passes over the tensors (:mod:`taskvec.analyze.stream`, exact top-k masks by
:mod:`taskvec.analyze.masks`), optional singular spectra of sampled layers
(:mod:`taskvec.analyze.spectra`) and a merge config's conflicts per layer
(:mod:`taskvec.analyze.conflicts`); the numbers (:mod:`taskvec.analyze.summary`) go to
``analysis.json`` and a self-contained ``index.html`` (:mod:`taskvec.analyze.report`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskvec.analyze.conflicts import layer_conflicts, merge_inputs, same_path
from taskvec.analyze.inputs import Inputs, PathLike, open_inputs
from taskvec.analyze.spectra import spectra
from taskvec.analyze.stream import run_passes
from taskvec.analyze.summary import summarize
from taskvec.errors import IncompatibleError

DEFAULT_FRACTIONS = (0.05, 0.2)
DEFAULT_TOL = 1e-8

__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_TOL", "Inputs", "Plan", "analyze", "plan_analysis"]


def analyze(
    base: PathLike | None,
    models: Sequence[PathLike],
    out: PathLike | None = None,
    *,
    merged: Sequence[PathLike] = (),
    names: list[str] | None = None,
    tol: float = DEFAULT_TOL,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    spectra_layers: int = 0,
    spectra_rank: int = 8,
    merge_config: PathLike | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse the task vectors of ``models`` (fine-tuned models or saved task vectors) over
    ``base``; write the report to ``out`` (a folder, made atomically) if given. ``merged``
    models are placed in the PCA plot and compared with the task vectors by cosine;
    ``spectra_layers`` > 0 adds the singular spectra of that many sampled layers (top
    ``spectra_rank`` subspaces); ``merge_config`` a mergekit-style config whose inputs'
    conflicts are located per layer (its base and inputs are used where ``base`` / ``models``
    lack them). Returns the numbers of ``analysis.json``."""
    start = time.perf_counter()
    plan = plan_analysis(base, models, merged, names, merge_config)
    inputs = plan.inputs
    if out is not None:
        from taskvec.analyze.report import check_out  # matplotlib: only for a report

        check_out(Path(out), inputs, overwrite)
    settings = {
        "near_zero_tol": tol,
        "top_k": list(fractions),
        "spectra_layers": spectra_layers,
        "spectra_rank": spectra_rank,
        "merge_config": None if merge_config is None else str(merge_config),
    }
    totals = run_passes(inputs, tol=tol, fractions=fractions, threads=threads, progress=progress)
    result = summarize(inputs, totals, settings)
    if spectra_layers > 0:
        result["spectra"] = spectra(
            inputs, spectra_layers, spectra_rank, threads=threads, progress=progress
        )
    if plan.merge_members:
        result["merge"] = layer_conflicts(result, plan.merge_members, plan.merge_weights)
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        from taskvec.analyze.report import write_report

        write_report(result, Path(out), overwrite=overwrite)
    return result


@dataclass(frozen=True)
class Plan:
    """The opened inputs, and which task vectors (with which weights) a ``--merge`` config
    merges."""

    inputs: Inputs
    merge_members: list[int]
    merge_weights: list[float]


def plan_analysis(
    base: PathLike | None,
    models: Sequence[PathLike],
    merged: Sequence[PathLike] = (),
    names: list[str] | None = None,
    merge_config: PathLike | None = None,
) -> Plan:
    """Everything an analysis checks from headers, before reading a tensor."""
    models = list(models)
    weights: dict[str, float] = {}
    if merge_config is not None:
        config_base, weights = merge_inputs(merge_config)
        if base is None:
            base = config_base
        elif config_base is not None and not same_path(base, config_base):
            raise IncompatibleError(
                f"{merge_config}: its base_model {config_base} is not the base {base}"
            )
        missing = [m for m in weights if not any(same_path(m, p) for p in models)]
        if names is not None and missing:
            raise IncompatibleError(f"--names: {merge_config} adds models {missing}")
        models += missing
    if base is None:
        raise IncompatibleError("give the base model (or a --merge config with base_model)")
    inputs = open_inputs(base, models, list(merged), names)
    members = [i for i, p in enumerate(models) if any(same_path(p, m) for m in weights)]
    member_weights = [
        next(w for m, w in weights.items() if same_path(models[i], m)) for i in members
    ]
    return Plan(inputs, members, member_weights)
