"""The report folder: ``index.html`` (self-contained: tables, and matplotlib plots embedded as
PNG data URIs, readable offline) and ``analysis.json`` (every number), written atomically by
:class:`~taskvec.io.writer.CheckpointWriter` (a locked temporary sibling renamed into place, with
a manifest that ``taskvec verify`` checks). Plots are drawn from the JSON-able result alone."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from taskvec import __version__
from taskvec.analyze.inputs import Inputs
from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import check_not_an_input
from taskvec.io.writer import CheckpointWriter, check_output_path

Result = dict[str, Any]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise TaskvecError(
            "the report's plots need matplotlib: pip install 'taskvec[analyze]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_out(out: Path, inputs: Inputs, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or is an input, before any work."""
    out = out.expanduser().absolute()
    check_output_path(out, overwrite)
    check_not_an_input(out, [c for v in inputs.vectors for c in v._leaves()])
    _pyplot()


def _png(fig: Any, plt: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _layer_axis(ax: Any, label: str = "layer") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _heatmap(plt: Any, matrix: list[list[float | None]], labels: list[str], title: str) -> str:
    """A pairwise matrix with its values written in; the diagonal (a vector with itself) is
    left blank so that the colours spread over the pairs."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 0.8 + 0.6 * n))
    values = [
        [math.nan if v is None or i == j else v for j, v in enumerate(row)]
        for i, row in enumerate(matrix)
    ]
    im = ax.imshow(values, cmap="viridis")
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i in range(n):
        for j in range(n):
            if not math.isnan(values[i][j]):
                color = "white" if values[i][j] < middle else "black"
                ax.text(
                    j, i, f"{values[i][j]:.3f}", ha="center", va="center", fontsize=7, color=color
                )
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig, plt)


def _norm_plots(plt: Any, result: Result) -> list[tuple[str, str]]:
    vectors = result["per_vector"]
    kinds = list(next(iter(vectors.values()))["norm_by_kind"])
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(vectors)
    for j, (label, pv) in enumerate(vectors.items()):
        xs = [k + (j - (len(vectors) - 1) / 2) * width for k in range(len(kinds))]
        ax.bar(xs, [pv["norm_by_kind"][k] for k in kinds], width, label=label)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("‖τ‖ of the module type")
    ax.legend(fontsize=7)
    by_kind = _png(fig, plt)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for label, pv in vectors.items():
        ax.plot(pv["norm_by_layer"], marker="o", ms=3, label=label)
    _layer_axis(ax)
    ax.set_ylabel("‖τ‖ of the layer")
    ax.legend(fontsize=7)
    return [("Norm per module type", by_kind), ("Norm per layer", _png(fig, plt))]


def _pair_lines(plt: Any, result: Result, key: str, ylabel: str) -> str:
    tasks = result["tasks"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for a in range(len(tasks)):
        for b in range(a + 1, len(tasks)):
            ys = [layer[a][b] for layer in result["per_layer"][key]]
            ax.plot(
                [math.nan if y is None else y for y in ys],
                marker="o",
                ms=3,
                label=f"{tasks[a]} · {tasks[b]}",
            )
    _layer_axis(ax)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    return _png(fig, plt)


def _pca_plot(plt: Any, result: Result) -> str:
    pca = result["pca"]
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    ax.scatter([0], [0], marker="s", color="black", label="base")
    for label, (x, y) in pca["coordinates"].items():
        merged = label in result["merged"]
        ax.annotate("", (x, y), (0, 0), arrowprops={"arrowstyle": "->", "alpha": 0.5})
        ax.scatter([x], [y], marker="*" if merged else "o", s=80 if merged else 40)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    explained = pca["explained"] + [0.0, 0.0]
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f} % of Σ‖τ‖²)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f} %)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    return _png(fig, plt)


def _plots(result: Result) -> list[tuple[str, str]]:
    """(title, data URI) of every figure."""
    plt = _pyplot()
    tasks = result["tasks"]
    out = _norm_plots(plt, result)
    pair = result["pairwise"]
    if len(tasks) > 1:
        out.append(("Cosine similarity", _heatmap(plt, pair["cosine"], tasks, "cos(τ_a, τ_b)")))
        out.append(
            (
                "Sign conflicts",
                _heatmap(
                    plt, pair["sign_conflict"], tasks, "opposite signs among entries both change"
                ),
            )
        )
        for k, masks in pair["top_k"].items():
            title = f"Top-{100 * float(k):g} % mask overlap"
            out.append((title, _heatmap(plt, masks["jaccard"], tasks, f"Jaccard, {title}")))
        if result["layers"]:
            out.append(("Cosine per layer", _pair_lines(plt, result, "cosine", "cosine")))
            out.append(
                ("Sign conflicts per layer", _pair_lines(plt, result, "sign_conflict", "conflict"))
            )
    out.append(("PCA of the task vectors (base at the origin)", _pca_plot(plt, result)))
    if "spectra" in result:
        out += _spectra_plots(plt, result)
    if "merge" in result:
        out.append(("Merge inputs: conflicts per layer", _merge_plot(plt, result["merge"])))
    return out


def _spectra_by_layer(result: Result) -> dict[int, list[dict[str, Any]]]:
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for r in result["spectra"]["tensors"].values():
        by_layer.setdefault(r["layer"], []).append(r)
    return by_layer


def _spectra_plots(plt: Any, result: Result) -> list[tuple[str, str]]:
    """Mean effective rank / side per sampled layer per task; the spectra (mean s_i/s_1 over
    the sampled tensors); the mean top-k subspace overlap between tasks."""
    sp, tasks = result["spectra"], result["tasks"]
    if not sp["tensors"]:
        return []
    rows = list(sp["tensors"].values())
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for t, task in enumerate(tasks):
        points = sorted(
            (layer, sum(r["effective_rank"][t] / r["side"] for r in rs) / len(rs))
            for layer, rs in _spectra_by_layer(result).items()
        )
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=task)
    _layer_axis(ax)
    ax.set_ylabel("effective rank / dimension")
    ax.legend(fontsize=7)
    eff = _png(fig, plt)
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for t, task in enumerate(tasks):
        n = min(len(r["spectrum"][t]) for r in rows)
        mean = [sum(r["spectrum"][t][i] for r in rows) / len(rows) for i in range(n)]
        ax.semilogy(mean, label=task)
    ax.set_xlabel("index i")
    ax.set_ylabel("s_i / s_1 (mean over tensors)")
    ax.legend(fontsize=7)
    spec = _png(fig, plt)
    n = len(tasks)
    mean_overlap = [
        [sum(r["overlap"][a][b] for r in rows) / len(rows) for b in range(n)] for a in range(n)
    ]
    title = f"top-{sp['rank']} subspace overlap"
    return [
        ("Effective rank per sampled layer", eff),
        ("Singular spectra of the sampled tensors", spec),
        ("Subspace overlap between tasks", _heatmap(plt, mean_overlap, tasks, title)),
    ]


def _merge_plot(plt: Any, merge: dict[str, Any]) -> str:
    rows = merge["per_layer"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    xs = [r["layer"] for r in rows]
    for key, label in [
        ("sign_conflict", "sign conflict"),
        ("cosine", "cosine"),
        ("norm_retained", "norm retained ρ"),
    ]:
        ax.plot(xs, [_or_nan(r[key]) for r in rows], marker="o", ms=3, label=label)
    for layer in merge["worst_layers"]:
        ax.axvline(layer, color="red", alpha=0.15, lw=4)
    _layer_axis(ax, "layer (shaded: most conflicting)")
    ax.legend(fontsize=7)
    return _png(fig, plt)


def table(head: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; floats shown with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return html.escape("–" if v is None else str(v))

    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _tables(result: Result) -> str:
    vectors = result["per_vector"]
    kinds = list(next(iter(vectors.values()))["norm_by_kind"])
    rows = [
        [
            label,
            pv["norm"],
            pv["max_abs"],
            100 * pv["near_zero_fraction"],
            *[pv["norm_by_kind"][k] for k in kinds],
        ]
        for label, pv in vectors.items()
    ]
    parts = [
        "<h2>Task vectors</h2>",
        table(["vector", "‖τ‖", "max |τ|", "near-zero %", *[f"‖τ‖ {k}" for k in kinds]], rows),
    ]
    tasks, pair = result["tasks"], result["pairwise"]
    if len(tasks) > 1:
        levels = list(pair["top_k"])
        rows = [
            [
                f"{tasks[a]} · {tasks[b]}",
                pair["cosine"][a][b],
                pair["angle_degrees"][a][b],
                _or_nan(pair["sign_conflict"][a][b]),
                *[pair["top_k"][k]["jaccard"][a][b] for k in levels],
            ]
            for a in range(len(tasks))
            for b in range(a + 1, len(tasks))
        ]
        head = [
            "pair",
            "cosine",
            "angle °",
            "sign conflict",
            *[f"Jaccard top-{100 * float(k):g} %" for k in levels],
        ]
        parts += ["<h2>Pairs</h2>", table(head, rows)]
    if result["merged"]:
        rows = [
            [m, result["pca"]["in_span"][m], *result["merged_cosine"][i]]
            for i, m in enumerate(result["merged"])
        ]
        parts += [
            "<h2>Merged models</h2>",
            table(
                ["merged", "share of ‖τ‖² in the tasks' span", *[f"cos · {t}" for t in tasks]], rows
            ),
        ]
    if "spectra" in result and result["spectra"]["tensors"]:
        sp = result["spectra"]
        rows = [
            [name, "×".join(map(str, r["shape"])), *r["effective_rank"], *r["top_k_energy"]]
            for name, r in sp["tensors"].items()
        ]
        head = [
            "tensor",
            "shape",
            *[f"eff. rank {t}" for t in tasks],
            *[f"top-{sp['rank']} energy {t}" for t in tasks],
        ]
        parts += [
            f"<h2>Spectra (layers {sp['layers']})</h2>",
            f"<details><summary>{len(rows)} tensors</summary>{table(head, rows)}</details>",
        ]
    if "merge" in result:
        merge = result["merge"]
        worst = [r for r in merge["per_layer"] if r["layer"] in merge["worst_layers"]]
        worst.sort(key=lambda r: merge["worst_layers"].index(r["layer"]))
        rows = [
            [r["layer"], _or_nan(r["sign_conflict"]), r["cosine"], _or_nan(r["norm_retained"])]
            for r in worst
        ]
        parts += [
            f"<h2>Merge config: where its inputs ({', '.join(merge['inputs'])}) conflict most</h2>",
            table(["layer", "sign conflict", "cosine", "norm retained ρ"], rows),
        ]
    return "\n".join(parts)


def _or_nan(v: float | None) -> float:
    return math.nan if v is None else v


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.9em; text-align: center; }
.meta { color: #666; font-size: 0.85em; }
"""


def render(result: Result) -> str:
    """The whole ``index.html``."""
    figures = "\n".join(
        f'<figure><img src="{uri}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, uri in _plots(result)
    )
    meta = (
        f"{len(result['tasks'])} task vectors, {result['tensors']} tensors, "
        f"{result['parameters']:,} parameters each, {result['layers']} layers; "
        f"taskvec {__version__}, {result['seconds']:.1f} s"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>taskvec analysis</title><style>{_STYLE}</style></head><body>"
        f'<h1>Task vector analysis</h1><p class="meta">{html.escape(meta)}</p>'
        f"{_tables(result)}<h2>Plots</h2>{figures}</body></html>\n"
    )


def write_report(result: Result, out: Path, *, overwrite: bool = False) -> Path:
    """Write ``index.html`` and ``analysis.json`` into the folder ``out``, atomically."""
    page = render(result)  # before the output is locked: a plotting error leaves nothing
    writer = CheckpointWriter(
        out, [], overwrite=overwrite, producer={"operation": "analyze", "tasks": result["tasks"]}
    )
    with writer:
        writer.add_json("analysis.json", result)
        writer.add_text("index.html", page)
        return writer.commit()
