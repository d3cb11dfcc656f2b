"""The benchmark's Python API: merge the experts with any config, score the merge on every task.

>>> from taskvec.bench.harness import Bench                     # doctest: +SKIP
>>> bench = Bench.open("full")           # builds what is missing, else loads it from the cache
>>> run = bench.run({"merge_method": "ties", "base_model": "base", "models": "experts",
...                  "parameters": {"density": 0.2, "lambda": 1.0}})
>>> run.result.average, run.normalized                          # test split, per-task in .result

A merge config is any config ``taskvec merge`` accepts, with three names for the benchmark's
models: ``base`` (the pretrained encoder), ``expert:<task>`` (the expert of one task) and, in
place of the ``models`` list, the string ``experts`` (every expert of the benchmark, each with
``weight: 1.0`` when the method takes per-model weights and the config sets none).

Merges run through :func:`taskvec.merge` into a scratch folder, are scored on the validation or
test split (each task with its own expert head) and the scratch folder is removed. The scores of
a config are cached under a hash of the resolved config, the random seed and the examples, so a
rerun of a sweep only merges what it has not scored yet.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from taskvec.bench.build import Built, build_benchmark
from taskvec.bench.config import PRESETS, BenchConfig
from taskvec.bench.encoder import EncoderSource
from taskvec.bench.evaluate import EvalResult
from taskvec.bench.sources import BenchError

BASE_REF = "base"
EXPERT_PREFIX = "expert:"
ALL_EXPERTS = "experts"
SPLITS = ("validation", "test")


@dataclass(frozen=True)
class Run:
    """One merged model scored on one split."""

    label: str
    method: str
    parameters: dict[str, Any]  # the config's top-level parameters
    split: str
    result: EvalResult
    reference: EvalResult  # the experts on their own tasks, same split
    merge_seconds: float
    eval_seconds: float
    cached: bool = False  # the scores (and timings) come from an earlier run of this config

    @property
    def normalized(self) -> float:
        return self.result.normalized(self.reference)[0]

    @property
    def normalized_stderr(self) -> float:
        return self.result.normalized(self.reference)[1]


def preset(name_or_config: str | BenchConfig) -> BenchConfig:
    if isinstance(name_or_config, BenchConfig):
        return name_or_config
    try:
        return PRESETS[name_or_config]
    except KeyError:
        raise BenchError(
            f"unknown benchmark {name_or_config!r}; known: {', '.join(PRESETS)}"
        ) from None


class Bench:
    """A built benchmark plus the merge-and-score loop (see the module docstring)."""

    def __init__(self, built: Built, *, seed: int = 0, progress: bool = True) -> None:
        self.built = built
        self.seed = seed
        self.progress = progress
        self.scratch = built.root / "merges" / built.config.name

    @classmethod
    def open(
        cls,
        config: str | BenchConfig = "full",
        *,
        cache: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        base: Path | None = None,
        seed: int = 0,
        progress: bool = True,
        echo: Callable[[str], None] = click.echo,
    ) -> Bench:
        """Build what is missing of benchmark ``config`` (a preset name or a BenchConfig)."""
        built = build_benchmark(
            preset(config), cache=cache, threads=threads, base=base, progress=progress, echo=echo
        )
        return cls(built, seed=seed, progress=progress)

    @property
    def tasks(self) -> list[str]:
        return list(self.built.tasks)

    # --- configs ----------------------------------------------------------------------------
    def ref(self, name: str) -> str:
        """The path behind a model name: ``base``, ``expert:<task>``, or a path (unchanged)."""
        if name == BASE_REF:
            return str(self.built.base)
        if name.startswith(EXPERT_PREFIX):
            task = name[len(EXPERT_PREFIX) :]
            if task not in self.built.experts:
                raise BenchError(
                    f"no expert {task!r} in benchmark {self.built.config.name}; "
                    f"experts: {', '.join(self.tasks)}"
                )
            return str(self.built.experts[task].path)
        return name

    def resolve(self, config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """A copy of ``config`` (a dict or a YAML file) with the benchmark's model names
        replaced by paths and ``models: experts`` expanded."""
        from taskvec import methods
        from taskvec.config import parse_config

        if not isinstance(config, Mapping):
            import yaml

            path = Path(config)
            if not path.is_file():
                raise BenchError(f"{path}: config file not found")
            config = yaml.safe_load(path.read_text())
            if not isinstance(config, Mapping):
                raise BenchError(f"{path}: a merge config must be a YAML mapping")
        cfg: dict[str, Any] = copy.deepcopy(dict(config))
        if "merge_method" not in cfg:
            raise BenchError("the config has no merge_method")
        method = methods.get_method(cfg["merge_method"])
        if cfg.get("models") == ALL_EXPERTS:
            takes_weight = "weight" in method.per_model
            top = cfg.get("parameters") or {}
            cfg["models"] = [
                {"model": f"{EXPERT_PREFIX}{t}"}
                | ({"parameters": {"weight": 1.0}} if takes_weight and "weight" not in top else {})
                for t in self.tasks
            ]
        for key in ("base_model", "tokenizer_source"):
            if isinstance(cfg.get(key), str):
                cfg[key] = self.ref(cfg[key])
        for entry in cfg.get("models") or []:
            entry["model"] = self.ref(entry["model"])
        for sl in cfg.get("slices") or []:
            if isinstance(sl.get("base_model"), str):
                sl["base_model"] = self.ref(sl["base_model"])
            for src in sl.get("sources") or []:
                src["model"] = self.ref(src["model"])
        cfg.setdefault("dtype", "float32")
        parse_config(cfg)  # a malformed config fails here, before anything runs
        return cfg

    # --- merging and scoring ----------------------------------------------------------------
    def merge(
        self, config: Mapping[str, Any] | str | os.PathLike[str], out: Path
    ) -> tuple[Path, float]:
        """Merge a (benchmark or plain) config into ``out``; returns it and the seconds taken."""
        import taskvec

        resolved = self.resolve(config)
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        taskvec.merge(
            resolved,
            out,
            overwrite=True,
            threads=self.built.threads,
            random_seed=self.seed,
            progress=False,
        )
        return out, time.perf_counter() - start

    def evaluate(
        self, encoder: EncoderSource, *, split: str = "test", label: str = ""
    ) -> EvalResult:
        """Accuracy of ``encoder`` (a folder, a state dict or a module) on every task."""
        if split not in SPLITS:
            raise BenchError(f"unknown split {split!r} (validation or test)")
        return self.built.evaluator.evaluate(encoder, self.built.heads, split=split, label=label)

    def run(
        self,
        config: Mapping[str, Any] | str | os.PathLike[str],
        *,
        split: str = "test",
        label: str | None = None,
        keep: Path | None = None,
    ) -> Run:
        """Merge ``config`` and score the merged encoder on ``split`` (cached by config)."""
        resolved = self.resolve(config)
        if label is None:
            label = str(resolved.get("name") or resolved["merge_method"])
        method = resolved["merge_method"]
        params = dict(resolved.get("parameters") or {})
        reference = self.built.reference(split)
        path = self._run_cache(resolved, split)
        if keep is None and path.exists():
            d = json.loads(path.read_text())
            result = EvalResult.from_json(d["scores"])
            return Run(
                label,
                method,
                params,
                split,
                result,
                reference,
                d["merge_seconds"],
                d["eval"],
                cached=True,
            )
        out = keep or self.scratch / f"run-{os.getpid()}"
        try:
            _, merge_seconds = self.merge(resolved, out)
            start = time.perf_counter()
            result = self.evaluate(out, split=split, label=label)
            eval_seconds = time.perf_counter() - start
        finally:
            if keep is None:
                shutil.rmtree(out, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        blob = {
            "scores": result.to_json(),
            "merge_seconds": round(merge_seconds, 2),
            "eval": round(eval_seconds, 2),
        }
        tmp.write_text(json.dumps(blob) + "\n")
        os.replace(tmp, path)
        return Run(label, method, params, split, result, reference, merge_seconds, eval_seconds)

    def _run_cache(self, resolved: Mapping[str, Any], split: str) -> Path:
        ev = self.built.evaluator
        h = hashlib.sha256(json.dumps([resolved, self.seed, split], sort_keys=True).encode())
        for task in self.tasks:
            head = self.built.heads[task]
            h.update(f"{task}|{head.fingerprint()}|{ev.batches(task, split).digest}".encode())
        return self.built.root / "runs" / f"{h.hexdigest()[:24]}.json"
