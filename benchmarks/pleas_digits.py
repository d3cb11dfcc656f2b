"""PLeaS on real digit images (issue 18, part 2): MLPs 64→64→64→10 trained from different
random initialisations on scikit-learn's bundled 8×8 digits, merged without a shared base.

    python benchmarks/pleas_digits.py --pairs 5

Scenarios: (a) ``same``: both models learn all ten digits; (b) ``split``: model A learns
digits 0–4, model B digits 5–9 (both with a ten-way head), scored on all ten. Rows: each
model alone, naive weight averaging, permutation-only (activation matching then averaging),
PLeaS at width budgets 1×/1.2×/1.5×, and the logit ensemble (2× size). Matching and the
least-squares fits use the unlabelled training images only. Accuracy on the held-out split,
mean ± sd over ``--pairs`` model pairs; results to ``benchmarks/results/pleas-digits.*``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from taskvec.pleas import (
    MLPStack,
    ensemble_logits,
    naive_average,
    permute_average,
    pleas_merge,
)

RESULTS = Path(__file__).resolve().parent / "results"
HIDDEN = (64, 64)
BUDGETS = (1.0, 1.2, 1.5)
SCENARIOS = {"same": (range(10), range(10)), "split": (range(5), range(5, 10))}


def train_mlp(x: np.ndarray, y: np.ndarray, seed: int, steps: int) -> MLPStack:
    """Full-batch Adam with weight decay; the seed sets the initialisation."""
    torch.manual_seed(seed)
    sizes = [x.shape[1], *HIDDEN, 10]
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [torch.nn.Linear(n_in, n_out)] + ([torch.nn.ReLU()] if i < len(HIDDEN) else [])
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    return MLPStack(
        tuple(m.weight.detach().double().numpy() for m in linears),
        tuple(m.bias.detach().double().numpy() for m in linears),
    )


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def run_pair(data: dict, scenario: str, seed: int, steps: int) -> dict[str, float]:
    x_tr, y_tr, x_te, y_te = data["x_tr"], data["y_tr"], data["x_te"], data["y_te"]
    models = []
    for k, labels in enumerate(SCENARIOS[scenario]):
        keep = np.isin(y_tr, list(labels))
        models.append(train_mlp(x_tr[keep], y_tr[keep], seed=1000 * seed + k, steps=steps))
    a, b = models
    row = {
        "model A": accuracy(a(x_te), y_te),
        "model B": accuracy(b(x_te), y_te),
        "naive average": accuracy(naive_average(a, b)(x_te), y_te),
        "permutation only": accuracy(permute_average(a, b, x_tr)(x_te), y_te),
    }
    for budget in BUDGETS:
        row[f"PLeaS {budget:g}x"] = accuracy(pleas_merge(a, b, x_tr, budget=budget)(x_te), y_te)
    row["ensemble (2x)"] = accuracy(ensemble_logits(a, b, x_te), y_te)
    return row


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows]))}
        for k in rows[0]
    }


def write_outputs(results: dict, pairs: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pleas-digits.json").write_text(json.dumps(results, indent=1) + "\n")
    names = list(results["summary"]["same"])
    lines = [
        f"Test accuracy (%) on sklearn digits, mean ± sd over {pairs} model pairs.",
        "",
        "| method | " + " | ".join(SCENARIOS) + " |",
        "|---|" + "---|" * len(SCENARIOS),
    ]
    for name in names:
        cells = [results["summary"][s][name] for s in SCENARIOS]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['sd']:.1f}" for c in cells)
            + " |"
        )
    (RESULTS / "pleas-digits.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(SCENARIOS)
    for i, s in enumerate(SCENARIOS):
        summ = results["summary"][s]
        ax.bar(
            np.arange(len(names)) + i * width,
            [100 * summ[n]["mean"] for n in names],
            width,
            yerr=[100 * summ[n]["sd"] for n in names],
            label=s,
        )
    ax.set_xticks(np.arange(len(names)) + width / 2, names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Merging digit MLPs from different initialisations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pleas-digits.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    data = {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te}
    per_pair = {
        s: [run_pair(data, s, seed, args.steps) for seed in range(args.pairs)] for s in SCENARIOS
    }
    results = {
        "pairs": args.pairs,
        "steps": args.steps,
        "hidden": HIDDEN,
        "per_pair": per_pair,
        "summary": {s: summarise(rows) for s, rows in per_pair.items()},
    }
    write_outputs(results, args.pairs)
    print((RESULTS / "pleas-digits.md").read_text())


if __name__ == "__main__":
    main()
