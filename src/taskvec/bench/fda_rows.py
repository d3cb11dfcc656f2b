"""The benchmark's FDA rows (Shi, Wen & Liu 2025): anchors built per block from every expert,
then a model adapted on them, from θ0 or from a merge, scored like every other row.

Rows ``fda_<start>_<init>``: start ∈ base, ta, tsv, wudi, and init ∈ gauss, weight. A merged
start is exactly the benchmark's TA / TSV / WUDI row: its sweep (coefficient chosen on
validation, every score cached) gives the config, and its test score is recorded in the FDA row
as ``start_normalized``, so "FDA at or above its starting point" can be read off the row.
Anchors are built once per init (cached under the benchmark's cache) and shared by the rows.

The cost curve (:meth:`FdaBench.cost_curve`) adapts from θ0 on the anchors as they were after
k construction steps (every other snapshot kept while building, plus the final anchors), and
records the test score against the construction plus adaptation time.
"""

from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskvec.bench.evaluate import EvalResult
from taskvec.bench.harness import Bench
from taskvec.bench.results import summary_row
from taskvec.bench.sweeps import SWEEPS, run_sweep
from taskvec.fda.adapt import AdaptSettings
from taskvec.fda.analysis import Sources
from taskvec.fda.anchors import AnchorSet, AnchorSettings
from taskvec.fda.pipeline import FDA, Start, anchor_file
from taskvec.forward import load_tokenizer, tokenize

PREFIX = "fda_"
INITS = ("gauss", "weight")
STARTS: dict[str, str | None] = {
    "base": None,
    "ta": "task_arithmetic",
    "tsv": "tsv",
    "wudi": "wudi",
}
LABELS = tuple(f"{PREFIX}{s}_{i}" for i in INITS for s in STARTS)
CURVE = "fda_cost_curve"
ANCHORS = AnchorSettings(anchors=64, steps=200, snapshots=8)
ADAPT = AdaptSettings()


@dataclass(frozen=True)
class FdaRow:
    start: str
    init: str

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.start}_{self.init}"

    def describe(self) -> str:
        return f"FDA from {self.start}, {self.init} anchors"

    @classmethod
    def parse(cls, label: str) -> FdaRow:
        start, init = label[len(PREFIX) :].rsplit("_", 1)
        return cls(start, init)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class FdaBench:
    """FDA on a built benchmark: cached anchors per init, starting merges, scored rows."""

    def __init__(self, bench: Bench, echo: Callable[[str], None] = lambda s: None) -> None:
        self.bench = bench
        self.echo = echo
        built = bench.built
        self.fda = FDA(built.base, {t: built.experts[t].path for t in bench.tasks})
        self.work = bench.scratch / "fda"
        self.work.mkdir(parents=True, exist_ok=True)

    def anchors(self, init: str) -> Path:
        """The anchor folder of ``init`` (built now if missing; cached across runs)."""
        s = AnchorSettings(**{**asdict(ANCHORS), "init": init})
        folder = self.bench.built.root / "fda" / f"anchors-{init}-a{s.anchors}-s{s.steps}"
        self.fda.construct(folder, s, progress=self.bench.progress, echo=self.echo)
        return folder

    def construct_seconds(self, folder: Path) -> float:
        return sum(
            AnchorSet.load(anchor_file(folder, i)).seconds
            for i in range(self.fda.blocks.num_blocks)
        )

    def start(self, name: str) -> tuple[Start, float | None, dict[str, Any] | None]:
        """The starting point of ``name``, its normalised test score and its config."""
        label = STARTS[name]
        if label is None:
            return Start(), None, None
        sweep = next(s for s in SWEEPS if s.label == label)
        outcome = run_sweep(self.bench, sweep)
        config = sweep.config(outcome.chosen)
        score = round(outcome.test.normalized, 4)
        if sweep.method == "task_arithmetic":
            return Start("task_arithmetic", float(outcome.chosen["lambda"])), score, config
        out = self.work / f"start-{name}"
        if not (out / "config.json").exists():
            self.bench.merge(config, out)
        return Start("model", 1.0, out), score, config

    def score(self, model: Path) -> EvalResult:
        return self.bench.evaluate(model, split="test", label=model.name)

    def adapt(self, anchors: Path, start: Start, out: Path) -> float:
        began = time.perf_counter()
        self.fda.adapt(
            anchors, out, start, ADAPT, overwrite=True, progress=self.bench.progress, echo=self.echo
        )
        return time.perf_counter() - began

    def row(self, label: str) -> dict[str, Any]:
        """Build (or reuse) the anchors, adapt, score: the results-JSON entry of ``label``."""
        spec = FdaRow.parse(label)
        folder = self.anchors(spec.init)
        start, start_score, start_config = self.start(spec.start)
        out = self.work / label
        try:
            adapt_seconds = self.adapt(folder, start, out)
            test = self.score(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        construct_seconds = self.construct_seconds(folder)
        row = summary_row(test, self.bench.built.reference("test"))
        row.update(
            method="fda",
            parameters={"init": spec.init, "start": spec.start},
            settings=_settings(),
            start_normalized=start_score,
            seconds=round(construct_seconds + adapt_seconds, 1),
            cost={
                "construct_seconds": round(construct_seconds, 1),
                "adapt_seconds": round(adapt_seconds, 1),
                "peak_rss_gb": round(_peak_rss_gb(), 2),
            },
            selection={
                "rule": "no coefficient chosen: FDA's settings are fixed in advance (the "
                "reference's adaptation settings; 64 anchors and 200 construction steps per "
                "block instead of 1200, see the cost curve); scored on test",
                "start": start_config,
            },
        )
        self.echo(
            f"  {label}: test normalised {row['normalized']:.4f} (start {row['start_normalized']})"
        )
        return row

    def cost_curve(self, init: str = "gauss") -> list[dict[str, Any]]:
        """Test score of FDA from θ0 on the anchors after k construction steps, vs time."""
        folder = self.anchors(init)
        sets = [AnchorSet.load(anchor_file(folder, i)) for i in range(self.fda.blocks.num_blocks)]
        total = sum(s.seconds for s in sets)
        points = []
        steps = sorted(set(sorted(sets[0].snapshots)[::2]) | {ANCHORS.steps})
        for k in steps:
            part = self.work / f"curve-{init}-{k}"
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            for s in sets:
                snap = s.anchors if k == s.settings.steps else s.snapshots[k]
                AnchorSet(s.block, s.tasks, snap, s.alignment, s.start_alignment, s.settings).save(
                    anchor_file(part, s.block)
                )
            out = self.work / f"curve-{init}-{k}-model"
            try:
                adapt_seconds = self.adapt(part, Start(), out)
                test = self.score(out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(part, ignore_errors=True)
            point = {
                "steps": k,
                "construct_seconds": round(total * k / ANCHORS.steps, 1),
                "adapt_seconds": round(adapt_seconds, 1),
                "normalized": round(test.normalized(self.bench.built.reference("test"))[0], 4),
            }
            self.echo(f"  curve {init} k={k}: {point}")
            points.append(point)
        return points


def _settings() -> dict[str, Any]:
    a, d = ANCHORS, ADAPT
    return {
        "anchors": a.anchors,
        "tokens": 5,
        "steps": a.steps,
        "lr": a.lr,
        "sigma": a.sigma,
        "adapt_loss": d.loss,
        "adapt_lr": d.lr,
        "coef_lr": d.coef_lr,
        "epochs": d.epochs,
        "batch": d.batch,
    }


def benchmark_sources(name: str = "full", examples: int = 256) -> Sources:
    """The benchmark's base, experts and the first ``examples`` training texts of each task
    (class-balanced: the splits are ordered round-robin over the classes)."""
    bench = Bench.open(name, progress=False, echo=lambda _: None)
    built = bench.built
    tok = load_tokenizer(built.base)
    max_len = built.config.train.max_len
    ids = {
        t: tokenize(tok, built.data[t].split("train").head(examples).texts, max_len)
        for t in bench.tasks
    }
    return Sources(
        built.base, {t: built.experts[t].path for t in bench.tasks}, ids, int(tok.pad_token_id)
    )
