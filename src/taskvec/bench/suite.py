"""``taskvec bench run``: every sweep and the negation study, written to the results JSON.

The JSON (and its Markdown table and PNG chart) is rewritten after every sweep, so an
interrupted run leaves the rows it finished; a rerun takes every scored config from the cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from taskvec.bench.adamerging_rows import LABELS as ADAMERGING_LABELS
from taskvec.bench.adamerging_rows import run_adamerging_row
from taskvec.bench.data_rows import ROWS as DATA_ROWS
from taskvec.bench.data_rows import run_data_row
from taskvec.bench.emr_row import LABEL as EMR_LABEL
from taskvec.bench.emr_row import run_emr
from taskvec.bench.fda_rows import CURVE as FDA_CURVE
from taskvec.bench.fda_rows import LABELS as FDA_LABELS
from taskvec.bench.fda_rows import FdaBench, FdaRow
from taskvec.bench.harness import Bench
from taskvec.bench.results import assemble, write_json, write_reports
from taskvec.bench.sweeps import (
    CONTROL_RATIO,
    NEGATION_LAMBDAS,
    SELECTION_RULE,
    SWEEPS,
    Sweep,
    available,
    negate,
    run_sweep,
)
from taskvec.bench.twin_row import ROWS as TWIN_ROWS
from taskvec.bench.twin_row import run_twin
from taskvec.errors import TaskvecError

SPECIALS: dict[str, str] = {
    EMR_LABEL: "EMR-merging: each task scored with its own modulated model",
    **{
        label: f"Twin-Merging (θ* = {m[0] if m else 'task arithmetic'}): shared merge + "
        "low-rank experts, each test input routed"
        for label, m in TWIN_ROWS.items()
    },
    **{label: f"{r.method} on per-expert {r.kind} statistics" for label, r in DATA_ROWS.items()},
    **{
        label: f"adamerging {g}-wise, entropy on unlabelled test inputs"
        for label, g in ADAMERGING_LABELS.items()
    },
    **{label: FdaRow.parse(label).describe() for label in FDA_LABELS},
    FDA_CURVE: "FDA from θ0: test score vs construction steps",
}


def run_suite(
    bench: Bench,
    out: Path | None,
    *,
    sweeps: Sequence[Sweep] = SWEEPS,
    negation: bool = True,
    specials: Sequence[str] = tuple(SPECIALS),
    update: bool = False,
    echo: Callable[[str], None] = click.echo,
) -> dict[str, Any]:
    """Run ``sweeps`` (those whose method exists), the ``specials`` (rows that are not one
    merge: EMR-merging, the FDA rows, the FDA cost curve), and with ``negation`` negate every
    task; write ``out`` (JSON, plus ``.md`` and ``.png``) after each step when ``out`` is given.

    With ``update``, the rows and negation results already in ``out`` (for the same
    benchmark and tasks) are kept unless this run replaces them."""
    start = time.perf_counter()
    built = bench.built
    tasks = bench.tasks
    have, missing = available(sweeps)
    if missing:
        echo(f"not in the method registry (yet), skipped: {', '.join(missing)}")
    base = bench.evaluate(built.base, label="base")
    reference = built.reference("test")
    merges: dict[str, dict[str, Any]] = {}
    negated: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    if update and out is not None and out.exists():
        old = json.loads(out.read_text())
        if old.get("benchmark") == built.config.name and old.get("tasks") == tasks:
            merges.update(old.get("merges", {}))
            negated.update({t: r for t, r in old.get("negation", {}).items() if t in tasks})
            curve = old.get(FDA_CURVE, [])

    def save() -> dict[str, Any]:
        data = assemble(
            benchmark=built.config.name,
            tasks=tasks,
            n_test={t: s.n for t, s in reference.scores.items()},
            n_validation={t: s.n for t, s in built.reference("validation").scores.items()},
            probe=built.probes(),
            base=base,
            experts=reference,
            merges=merges,
            extra=_extras(bench, negated, missing, time.perf_counter() - start)
            | ({FDA_CURVE: curve} if curve else {}),
        )
        if out is not None:
            write_json(data, out)
            write_reports(data, out)
        return data

    for sweep in have:
        echo(f"{sweep.label} ({sweep.method})")
        try:
            merges[sweep.label] = run_sweep(bench, sweep, echo=echo).to_json()
        except TaskvecError as e:  # one failing method must not stop the others
            echo(f"  {sweep.label} failed: {e}")
            missing.append(f"{sweep.label} (failed: {e})")
            continue
        save()
    fda = FdaBench(bench, echo) if set(specials) & {*FDA_LABELS, FDA_CURVE} else None
    for label in specials:
        echo(label)
        if label == EMR_LABEL:
            merges[label] = run_emr(bench, echo=echo)
        elif label in TWIN_ROWS:
            shared = TWIN_ROWS[label]
            merge = {} if shared is None else {"method": shared[0], "parameters": shared[1]}
            merges[label] = run_twin(bench, echo=echo, **merge)
        elif label in DATA_ROWS:
            merges[label] = run_data_row(bench, label, echo=echo)
        elif label in ADAMERGING_LABELS:
            merges[label] = run_adamerging_row(bench, label, echo=echo)
        elif label == FDA_CURVE and fda is not None:
            curve = fda.cost_curve()
        elif fda is not None:
            merges[label] = fda.row(label)
        save()
    if negation:
        echo("negation: θ0 − λτ_t")
        for task in tasks:
            negated[task] = negate(bench, task, echo=echo)
            save()
    return save()


def _extras(
    bench: Bench, negated: dict[str, Any], missing: list[str], seconds: float
) -> dict[str, Any]:
    built = bench.built
    extra: dict[str, Any] = {
        "expert_check": {t: c.to_json() for t, c in built.checks.items()},
        "replaced": built.replaced,
        "dropped": built.dropped,
        "selection_rule": SELECTION_RULE,
        "settings": {
            "train": built.config.train.__dict__,
            "probe_train": built.config.probe_train,
            "min_margin_points": built.config.min_margin,
            "threads": built.threads,
            "random_seed": bench.seed,
        },
        "timings": {
            "experts_train_seconds": {
                t: c.train_seconds for t, c in built.checks.items() if t in built.tasks
            },
            "suite_seconds": round(seconds, 1),
        },
        "missing": missing,
    }
    if negated:
        extra["negation"] = {
            "protocol": (
                f"θ0 − λτ_t via task_arithmetic (weight −1); λ from {list(NEGATION_LAMBDAS)} "
                f"ascending, stopping at the first λ where some other task falls below "
                f"{CONTROL_RATIO:.0%} of the base's validation accuracy; the last λ that passed "
                "is scored on test. 'target' uses the task's own expert head."
            ),
            **negated,
        }
    return extra
