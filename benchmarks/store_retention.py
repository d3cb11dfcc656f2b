"""Retention of stored task vectors: how much accuracy each store codec keeps.

For each codec, every expert's task vector τ_t = θ_t − θ_0 of the benchmark (MiniLM experts,
``taskvec.bench``) is added to a scratch store with that codec; then

* each decoded expert θ_0 + τ̂_t is scored on its own task: retention = acc(θ_0 + τ̂_t) /
  acc(θ_t);
* task arithmetic, TIES, TSV-M and Iso-C merges are made from the decoded vectors
  (``store:NAME`` models) and scored on every task: retention = avg acc(merge of τ̂) /
  avg acc(merge of τ) (the same merge from the exact vectors);
* the bytes on disk are the blobs' (header included), against τ in float32.

The merges use fixed parameters (the ones chosen on validation for the full preset in
docs/benchmark.md). Results: ``benchmarks/results/store-retention.{json,md,png}``.

    .venv/bin/python benchmarks/store_retention.py --preset full
    .venv/bin/python benchmarks/store_retention.py --preset lite --codecs exact,int4 --methods ta
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from taskvec.bench.harness import Bench
from taskvec.store.equip import using_store
from taskvec.store.store import Store

RESULTS = Path(__file__).parent / "results"
CODECS = [
    "exact",
    "int8",
    "int4",
    "int3",
    "int2",
    "int3/g128/minmax",
    "sign",
    "lowrank/r16",
    "topk/0.1",
    "dare/0.9/s0",
    "rtvq",
]
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {  # label: method, parameters, weights
    "ta": ("task_arithmetic", {"lambda": 0.3}, True),
    "ties": ("ties", {"density": 0.2, "lambda": 1.0}, True),
    "tsv": ("tsv", {"alpha": 1.0}, False),
    "iso_c": ("iso_c", {"alpha": 3.0}, False),
}


def _slug(codec: str) -> str:
    return codec.replace("/", "_").replace(".", "p").replace(":", "-").replace("+", "-")


def _merge_config(bench: Bench, label: str, codec: str) -> dict[str, Any]:
    method, params, weights = METHODS[label]
    models = []
    for task in bench.tasks:
        entry: dict[str, Any] = {"model": f"store:{_slug(codec)}-{task}"}
        if weights:
            entry["parameters"] = {"weight": 1.0}
        models.append(entry)
    return {"merge_method": method, "base_model": "base", "models": models, "parameters": params}


def _store_codec(bench: Bench, store: Store, codec: str) -> dict[str, Any]:
    """Every expert's τ added with ``codec`` (``rtvq``: ``store add-rtvq``'s defaults, a shared
    3-bit base and 2-bit offsets; ``rtvq:SHARED+OFFSETS`` with those codecs): bytes (the shared
    base's included), bits and errors."""
    base = bench.ref("base")
    sources = {f"{_slug(codec)}-{t}": bench.ref(f"expert:{t}") for t in bench.tasks}
    if codec.split(":")[0] == "rtvq":
        chosen = codec.partition(":")[2].split("+") if ":" in codec else []
        codecs = dict(zip(["shared_codec", "codec"], chosen, strict=False))
        shared, *records = store.add_rtvq(f"{_slug(codec)}-shared", sources, base=base, **codecs)
    else:
        shared, records = (
            None,
            [store.add(n, s, base=base, codec=codec) for n, s in sources.items()],
        )
    params = sum(r.params for r in records)
    stored = sum(r.blob_bytes for r in records) + (shared.blob_bytes if shared else 0)
    return {
        "bytes": stored,
        "fp32_bytes": 4 * params,
        "bits_per_parameter": 8 * stored / params,
        "rel_error": {r.name.rsplit("-", 1)[-1]: r.rel_error for r in records},
    }


def _experts(bench: Bench, store: Store, codec: str, split: str) -> dict[str, float]:
    """Each decoded expert's accuracy on its own task, over the exact expert's."""
    import taskvec as tv

    reference = bench.built.reference(split)
    base = tv.load_model(bench.ref("base"))
    heads = bench.built.heads
    out = {}
    for task in bench.tasks:
        decoded = (base + store.vector(f"{_slug(codec)}-{task}")).state_dict()
        result = bench.built.evaluator.evaluate(decoded, {task: heads[task]}, split=split)
        out[task] = result.scores[task].accuracy / reference.scores[task].accuracy
    return out


def _merge_accuracy(bench: Bench, label: str, codec: str, split: str, scratch: Path) -> float:
    out, _ = bench.merge(_merge_config(bench, label, codec), scratch / f"{label}-{_slug(codec)}")
    try:
        return bench.evaluate(out, split=split, label=f"{label} {codec}").average
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(
    preset: str, codecs: list[str], methods: list[str], split: str, out: Path | None
) -> dict[str, Any]:
    """Measure every codec; the results so far are written to ``out`` after each one (with
    ``out`` None, only the stored sizes are measured: nothing is evaluated or written)."""
    bench = Bench.open(preset, progress=False)
    results: dict[str, Any] = {"preset": preset, "split": split, "tasks": bench.tasks}
    scratch = Path(tempfile.mkdtemp(prefix="store-retention-"))
    store = Store(scratch / "store", create=True)
    rows: dict[str, Any] = {}
    exact_merges: dict[str, float] = {}
    try:
        with using_store(store):
            for codec in ["exact", *[c for c in codecs if c != "exact"]]:
                start = time.perf_counter()
                row = _store_codec(bench, store, codec)
                if out is None:
                    rows[codec] = row
                    print(f"{codec}: {row['bits_per_parameter']:.3f} bits", file=sys.stderr)
                    continue
                row["experts"] = _experts(bench, store, codec, split)
                row["merges"] = {}
                for label in methods:
                    acc = _merge_accuracy(bench, label, codec, split, scratch)
                    exact_merges.setdefault(label, acc)
                    row["merges"][label] = {
                        "accuracy": acc,
                        "retention": acc / exact_merges[label],
                    }
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows[codec] = row
                print(f"{codec}: {json.dumps(_summary(row))}", file=sys.stderr)
                write({**results, "codecs": rows}, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**results, "codecs": rows}


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    experts = row["experts"]
    return {
        "bits": round(row["bits_per_parameter"], 3),
        "experts": round(sum(experts.values()) / len(experts), 4),
        **{k: round(v["retention"], 4) for k, v in row["merges"].items()},
    }


def markdown(results: dict[str, Any]) -> str:
    methods = list(next(iter(results["codecs"].values()))["merges"])
    head = ["codec", "bits/param", "MB", "× fp32", "rel. error", "experts", *methods]
    lines = [
        f"Store codec retention on the {results['preset']} benchmark ({results['split']} split, "
        f"{len(results['tasks'])} tasks): accuracy of decoded experts and of merges of decoded "
        "vectors, over the same from exact vectors.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|",
    ]
    for codec, row in results["codecs"].items():
        experts = row["experts"]
        errors = row["rel_error"]
        cells = [
            f"`{codec}`",
            f"{row['bits_per_parameter']:.2f}",
            f"{row['bytes'] / 1e6:.1f}",
            f"{row['bytes'] / row['fp32_bytes']:.3f}",
            f"{sum(errors.values()) / len(errors):.3f}",
            f"{sum(experts.values()) / len(experts):.4f}",
            *[f"{row['merges'][m]['retention']:.4f}" for m in methods],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["codecs"].items(), key=lambda kv: kv[1]["bits_per_parameter"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bits = [r["bits_per_parameter"] for _, r in rows]
    experts = [sum(r["experts"].values()) / len(r["experts"]) for _, r in rows]
    ax.plot(bits, experts, "o-", label="decoded experts")
    for method in next(iter(results["codecs"].values()))["merges"]:
        ax.plot(bits, [r["merges"][method]["retention"] for _, r in rows], "s--", label=method)
    for codec, r in rows:
        ax.annotate(codec, (r["bits_per_parameter"], 1.0), fontsize=6, rotation=60)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stored bits per parameter")
    ax.set_ylabel("retention (accuracy / exact)")
    ax.set_title(f"store codecs, {results['preset']} benchmark")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", help="lite or full")
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec specs")
    p.add_argument("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, default=RESULTS / "store-retention")
    p.add_argument(
        "--sizes-only",
        action="store_true",
        help="measure the stored bytes only (of a lossless variant of a measured codec)",
    )
    args = p.parse_args()
    codecs, methods = args.codecs.split(","), args.methods.split(",")
    results = run(args.preset, codecs, methods, args.split, None if args.sizes_only else args.out)
    if not args.sizes_only:
        print(markdown(results))


def write(results: dict[str, Any], out: Path) -> None:
    """``out``.json, .md and .png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
