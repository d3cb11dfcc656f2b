"""What a coefficient search leaves in its output folder, beside ``study.db``:

- ``best.yaml``: the best point's config, a plain merge config with paths (``taskvec merge
  best.yaml OUT`` reproduces the merge);
- ``report.json``: the settings, every trial (values, scores, timings), the best point, its
  held-out (test) score when the objective has one, trials per hour;
- ``history.png`` (score of every trial and the best so far), ``importance.png`` (Optuna's
  parameter importances, when there are two dimensions or more), ``pareto.png`` (with several
  objectives: every trial's mean against its worst objective, the Pareto front marked).

Each file is replaced atomically.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from taskvec.io.durable import write_file_atomically


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "values": t.values,
                **{k: v for k, v in t.user_attrs.items()},
            }
        )
    return rows


def write_best_config(out: Path, config: dict[str, Any], header: list[str]) -> Path:
    path = out / "best.yaml"
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False)
    write_file_atomically(path, text.encode())
    return path


def write_report(out: Path, report: dict[str, Any]) -> Path:
    path = out / "report.json"
    write_file_atomically(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_plots(out: Path, study: Any, dims: int) -> list[str]:
    """The PNG plots of the study (see the module docstring); the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    complete = [
        t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    if not complete:
        return []
    written = []
    multi = len(study.directions) > 1
    means = [float(np.mean(t.values)) for t in complete]

    fig, ax = plt.subplots(figsize=(7, 4))
    numbers = [t.number for t in complete]
    ax.plot(numbers, means, "o", ms=4, alpha=0.6, label="trial")
    ax.plot(numbers, np.maximum.accumulate(means), "-", lw=2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean objective" if multi else "objective")
    ax.set_title("optimisation history")
    ax.legend()
    write_file_atomically(out / "history.png", _png(fig))
    plt.close(fig)
    written.append("history.png")

    if dims >= 2 and len(complete) >= 4:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = (lambda t: float(np.mean(t.values))) if multi else None
            ax = optuna.visualization.matplotlib.plot_param_importances(study, target=target)
        write_file_atomically(out / "importance.png", _png(ax.figure))
        plt.close(ax.figure)
        written.append("importance.png")

    if multi:
        front = {t.number for t in study.best_trials}
        worst = [float(np.min(t.values)) for t in complete]
        fig, ax = plt.subplots(figsize=(6, 5))
        on = [i for i, t in enumerate(complete) if t.number in front]
        off = [i for i, t in enumerate(complete) if t.number not in front]
        ax.scatter([means[i] for i in off], [worst[i] for i in off], s=14, alpha=0.5, label="trial")
        ax.scatter(
            [means[i] for i in on], [worst[i] for i in on], s=30, c="C3", label="Pareto front"
        )
        ax.set_xlabel("mean over objectives")
        ax.set_ylabel("worst objective")
        ax.set_title("trials: mean vs worst objective")
        ax.legend()
        write_file_atomically(out / "pareto.png", _png(fig))
        plt.close(fig)
        written.append("pareto.png")
    return written
