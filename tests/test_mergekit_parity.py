"""Parity with mergekit 0.1.5 itself, run as a test-only dependency in its own environment.

mergekit is found as an executable ``mergekit-yaml`` at ``$MERGEKIT_YAML`` or on ``PATH``
(e.g. a venv made with ``python3 -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install
torch==2.13.0 && /tmp/mk-venv/bin/pip install mergekit==0.1.5``); without it, or with another
version, the module is skipped.

Tiny float32 Llama checkpoints (base + 3 fine-tunes = base + noise) are written once; each case
is ONE YAML file given unchanged to both ``mergekit-yaml CONFIG OUT --no-write-model-card
--no-copy-tokenizer`` and ``taskvec.merge.merge(CONFIG, OUT)``. Deterministic methods must agree
on every tensor to a relative error of 1e-5; DARE/DELLA are compared statistically.

To keep the module fast, all mergekit runs happen in one child process of mergekit's own
interpreter that calls the ``mergekit-yaml`` command (its click entry point) once per YAML, with
the same arguments as the command line; if that interpreter cannot be found, each YAML is run
through the executable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from taskvec.merge import merge as tv_merge

pytestmark = pytest.mark.mergekit

MERGEKIT_VERSION = "0.1.5"
FLAGS = ["--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
REL_TOL = 1e-5


def _find_mergekit_yaml() -> str | None:
    env = os.environ.get("MERGEKIT_YAML")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("mergekit-yaml")


def _interpreter(exe: str) -> str | None:
    """The Python that runs the ``mergekit-yaml`` script (from its shebang), if any."""
    try:
        first = Path(exe).read_bytes()[:300].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].strip().split()
    if not parts:
        return None
    cand = parts[0]
    if Path(cand).name == "env" and len(parts) > 1:  # `#!/usr/bin/env python3`
        cand = shutil.which(parts[-1]) or ""
    return cand if cand and os.access(cand, os.X_OK) else None


MERGEKIT_YAML = _find_mergekit_yaml()
if MERGEKIT_YAML is None:
    pytest.skip(
        "mergekit-yaml not found (set MERGEKIT_YAML or put mergekit 0.1.5 on PATH)",
        allow_module_level=True,
    )
transformers = pytest.importorskip("transformers")
MK_PYTHON = _interpreter(MERGEKIT_YAML)

# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

WIDE = {  # the brief's tiny Llama
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
}
DEEP = {**WIDE, "num_hidden_layers": 4}  # gradients evaluated between their knots
SMALL = {  # 10-wide: tensors of 10 and 100 entries, where ⌊density·n⌋ is an exact integer
    "hidden_size": 10,
    "intermediate_size": 10,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "vocab_size": 20,
}


def _family(root: Path, prefix: str, dims: dict[str, int], seed: int) -> dict[str, Path]:
    """base + 3 fine-tunes: τᵢ = 0.02·(shared + own) noise, with ~30% of entries unchanged."""
    cfg = transformers.LlamaConfig(**dims, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    paths = {"base": root / f"{prefix}base"}
    model.save_pretrained(paths["base"])
    for i in range(3):
        sd = {}
        for k, v in base.items():
            own = torch.randn(v.shape, generator=g)
            keep = torch.rand(v.shape, generator=g) > 0.3
            sd[k] = v + 0.02 * (shared[k] + own) * keep
        model.load_state_dict(sd)
        paths[f"ft{i}"] = root / f"{prefix}ft{i}"
        model.save_pretrained(paths[f"ft{i}"])
    return paths


ROBERTA = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 40,
    "max_position_embeddings": 24,
    "num_labels": 3,
}


def _roberta_family(root: Path, seed: int) -> dict[str, Path]:
    """base + 2 fine-tunes of a tiny RoBERTa classifier, where only the base file holds the
    int64 buffer ``roberta.embeddings.position_ids`` (older checkpoints store it, transformers 5
    no longer saves it): both tools must copy it from the base."""
    from safetensors.torch import save_file

    cfg = transformers.RobertaConfig(**ROBERTA)
    torch.manual_seed(seed)
    model = transformers.RobertaForSequenceClassification(cfg).float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"base": root / "r_base"}
    model.save_pretrained(paths["base"])
    sd = load_file(str(paths["base"] / "model.safetensors"))
    sd["roberta.embeddings.position_ids"] = torch.arange(ROBERTA["max_position_embeddings"])[None]
    save_file(sd, str(paths["base"] / "model.safetensors"), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(2):
        model.load_state_dict(
            {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        )
        paths[f"ft{i}"] = root / f"r_ft{i}"
        model.save_pretrained(paths[f"ft{i}"])
    return paths


# --------------------------------------------------------------------------------------------
# cases: (name, config builder, family) — one YAML each
# --------------------------------------------------------------------------------------------


def _models(p: dict[str, Path], params: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    out = []
    for i, prm in enumerate(params):
        entry: dict[str, Any] = {"model": str(p[f"ft{i}"])}
        if prm is not None:
            entry["parameters"] = prm
        out.append(entry)
    return out


def _cfg(method: str, p, params, base: bool = True, top=None, **extra) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if base:
        cfg["base_model"] = str(p["base"])
    cfg["models"] = _models(p, params)
    if top:
        cfg["parameters"] = top
    cfg.update(extra)
    return cfg


W3 = [{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.3}]


def _cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    base_and_ft0 = [{"model": str(p["base"])}, {"model": str(p["ft0"])}]
    return {
        # linear: per-model gradient, per-model filter list, top-level normalize
        "linear": _cfg(
            "linear",
            p,
            [
                {"weight": 0.5},
                {"weight": [0.2, 1.0]},
                {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.3}]},
            ],
            base=False,
        ),
        "linear_unnormalized_filters": _cfg(
            "linear",
            p,
            [None, None, {"weight": 0.25}],
            base=False,
            top={
                "normalize": False,
                "weight": [
                    {"filter": "self_attn", "value": [0.1, 0.9]},
                    {"filter": "norm", "value": 0.5},
                    {"value": 0.4},
                ],
            },
        ),
        "task_arithmetic": _cfg(
            "task_arithmetic",
            p,
            [{"weight": 1.0}, {"weight": -0.5}, {"weight": [0.2, 0.8]}],
            top={"lambda": 0.7},
        ),
        "task_arithmetic_normalize": _cfg(
            "task_arithmetic", p, W3, top={"normalize": True, "lambda": [1.0, 1.5]}
        ),
        # ties: per-model density filters and gradients, top-level λ gradient
        "ties": _cfg(
            "ties",
            p,
            [
                {"weight": 1.0, "density": 0.5},
                {
                    "weight": [0.3, 1.0],
                    "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}],
                },
                {"weight": 0.7, "density": [0.2, 0.6]},
            ],
            top={"lambda": [{"filter": "self_attn", "value": [0.9, 1.2]}, {"value": 1.0}]},
        ),
        "ties_unnormalized_rescaled": _cfg(
            "ties",
            p,
            [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.4}, None],
            top={
                "normalize": False,
                "rescale": True,
                "int8_mask": True,
                "weight": 0.8,
                "density": 0.5,
            },
        ),
        "breadcrumbs": _cfg(
            "breadcrumbs",
            p,
            [
                {"weight": 1.0, "density": 0.6, "gamma": 0.05},
                {"weight": 0.5, "density": 0.5, "gamma": 0.0},
                {"weight": 0.8, "density": 0.8, "gamma": 0.3},
            ],
        ),
        "breadcrumbs_ties": _cfg(
            "breadcrumbs_ties",
            p,
            [
                {"weight": 1.0, "density": 0.6, "gamma": 0.05},
                {"weight": 0.5, "density": 0.5, "gamma": 0.02},
                {"weight": 0.8, "density": 0.4, "gamma": 0.0},
            ],
            top={"normalize": True},
        ),
        "slerp": {
            "merge_method": "slerp",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "models": base_and_ft0,
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.2, 0.8]},
                    {"filter": "mlp", "value": 0.6},
                    {"value": 0.4},
                ]
            },
        },
        "nuslerp_base": _cfg("nuslerp", p, [{"weight": 1.0}, {"weight": 2.0}]),
        "nuslerp_rows": _cfg(
            "nuslerp",
            p,
            [{"weight": 1.0}, {"weight": 0.5}],
            base=False,
            top={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        ),
        "nuslerp_cols": _cfg(
            "nuslerp",
            p,
            [{"weight": 0.3}, {"weight": 0.5}],
            top={"nuslerp_flatten": False},
        ),
        "multislerp": _cfg("multislerp", p, W3, base=False),
        "multislerp_base": _cfg("multislerp", p, W3, top={"normalize_weights": False, "eps": 1e-7}),
        "karcher": _cfg("karcher", p, [None, None, None], base=False),
        "model_stock": _cfg("model_stock", p, [None, None, None]),
        "model_stock_filter_wise": _cfg(
            "model_stock", p, [None, None, None], top={"filter_wise": True}
        ),
        "nearswap": {
            "merge_method": "nearswap",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "models": base_and_ft0,
            "parameters": {"t": [{"filter": "mlp", "value": 0.005}, {"value": 0.02}]},
        },
        "ram": _cfg("ram", p, [None, None, None]),
        "ramplus_tl": _cfg(
            "ramplus_tl", p, [None, None, None], top={"r": 0.3, "alpha": 0.5, "epsilon": 1e-4}
        ),
        "sce": _cfg("sce", p, [None, None, None]),
        "sce_topk": _cfg("sce", p, [None, None, None], top={"select_topk": 0.5, "int8_mask": True}),
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "models": base_and_ft0,
        },
        # mergekit adds a base_model missing from `models` as one more input, so for the
        # methods without a base role it is averaged in (here with the top-level weight)
        "linear_with_base_model": _cfg(
            "linear", p, [None, None, {"weight": 2.0}], top={"weight": 1.0}
        ),
        "karcher_with_base_model": _cfg("karcher", p, [None, None, None]),
        "passthrough_slices": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(p["ft0"]), "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {
                            "model": str(p["ft1"]),
                            "layer_range": [1, 2],
                            "parameters": {
                                "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]
                            },
                        }
                    ]
                },
            ],
        },
        "task_arithmetic_slices": {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(p["base"]), "layer_range": [0, 2]},
                        {
                            "model": str(p["ft0"]),
                            "layer_range": [0, 2],
                            "parameters": {"weight": [0.0, 1.0]},
                        },
                        {
                            "model": str(p["ft1"]),
                            "layer_range": [0, 2],
                            "parameters": {"weight": 0.5},
                        },
                    ]
                }
            ],
        },
    }


def _deep_cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """4 layers: a 3-point gradient is read at t = 1/3 and 2/3 (between knots), and in
    slices t restarts in each slice."""
    return {
        "deep_ties_gradients": _cfg(
            "ties",
            p,
            [
                {"weight": [1.0, 0.3, 0.8], "density": [0.2, 0.9]},
                {
                    "weight": 0.5,
                    "density": [{"filter": "mlp", "value": [0.9, 0.3]}, {"value": 0.5}],
                },
                {"weight": [0.1, 1.0], "density": 0.6},
            ],
            top={"lambda": [1.0, 1.4, 0.8]},
        ),
        "deep_slerp_gradient": {
            "merge_method": "slerp",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "models": [{"model": str(p["base"])}, {"model": str(p["ft1"])}],
            "parameters": {
                "t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]
            },
        },
        "deep_passthrough_slices": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(p["ft0"]), "layer_range": [0, 3]}]},
                {"sources": [{"model": str(p["ft1"]), "layer_range": [2, 4]}]},
            ],
        },
        "deep_task_arithmetic_slices": {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(p["base"]), "layer_range": [0, 3]},
                        {
                            "model": str(p["ft0"]),
                            "layer_range": [0, 3],
                            "parameters": {"weight": [0.0, 0.4, 1.0]},
                        },
                    ],
                    "parameters": {"lambda": [0.5, 1.5]},
                },
                {
                    "sources": [
                        {"model": str(p["base"]), "layer_range": [3, 4]},
                        {
                            "model": str(p["ft2"]),
                            "layer_range": [3, 4],
                            "parameters": {"weight": 0.7},
                        },
                    ]
                },
            ],
        },
        # a gradient in a one-layer slice: mergekit (plan.py plan_slice) reads it at t = 1
        "deep_single_layer_slice_gradient": {
            "merge_method": "task_arithmetic",
            "dtype": "float32",
            "base_model": str(p["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(p["base"]), "layer_range": [0, 3]},
                        {
                            "model": str(p["ft0"]),
                            "layer_range": [0, 3],
                            "parameters": {"weight": 1.0},
                        },
                    ]
                },
                {
                    "sources": [
                        {"model": str(p["base"]), "layer_range": [3, 4]},
                        {
                            "model": str(p["ft2"]),
                            "layer_range": [3, 4],
                            "parameters": {"weight": [0.7, 0.2]},
                        },
                    ]
                },
            ],
        },
    }


def _small_cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    two = [{"weight": 1.0, "density": 0.7}, {"weight": 1.0, "density": 0.7}]
    return {
        # 10-entry tensors: ⌊0.7·10⌋ = 7
        "small_ties_density_0.7": _cfg("ties", p, two),
        # 100-entry tensors: default γ = 0.01 drops exactly ⌊0.01·100⌋ = 1 outlier
        "small_breadcrumbs_default_gamma": _cfg(
            "breadcrumbs", p, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
        ),
        # mergekit's task_arithmetic accepts (and ignores) the sparsification parameters
        "small_task_arithmetic_with_density": _cfg(
            "task_arithmetic",
            p,
            [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}],
            top={"rescale": False},
        ),
    }


def _buffer_cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The experts lack the base's non-float buffer: taken from the base, not an error."""
    return {
        "roberta_ties_position_ids": _cfg(
            "ties", p, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}]
        ),
        # linear has no base role: the unlisted base_model is one more input, the only one
        # with the buffer
        "roberta_linear_position_ids": _cfg("linear", p, [None, None], top={"weight": 1.0}),
    }


# Known differences from mergekit 0.1.5, as {case: reason}: each is a strict xfail (none now).
KNOWN: dict[str, str] = {}

STATISTICAL = {
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.5, "epsilon": 0.2},
}


def _stat_cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for method, prm in STATISTICAL.items():
        params = [{"weight": w, **prm} for w in (1.0, 0.6, 0.3)]
        out[f"stat_{method}"] = _cfg(method, p, params)
        if method.endswith("linear"):
            out[f"stat_{method}_expectation"] = _cfg(
                method, p, params, top={"rescale": "expectation"}
            )
    return out


BIG = {  # statistical parity: 196 608-entry MLP matrices (rows of 256 and 768 entries)
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
BIG_DENSITY, BIG_EPSILON = 0.4, 0.2
BIG_WEIGHTS = (1.0, 0.6, 0.3)
BIG_SEEDS = (1234, 1, 2, 3, 4, 5, 6, 7)  # taskvec's seed-to-seed spread of each statistic


def _big_params(method: str, weight: float) -> dict[str, float]:
    prm = {"weight": weight, "density": BIG_DENSITY}
    if method.startswith("della"):
        prm["epsilon"] = BIG_EPSILON
    return prm


def _big_stat_cases(p: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per random method: one expert (its mask and rescale factor can be read back from the
    output) and three experts (the merged Δ)."""
    out = {}
    for method in STATISTICAL:
        out[f"stat_big_{method}_one"] = _cfg(method, p, [_big_params(method, 1.0)])
        out[f"stat_big_{method}_three"] = _cfg(
            method, p, [_big_params(method, w) for w in BIG_WEIGHTS]
        )
    return out


DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
status = {}
for cfg, out, extra in json.loads(sys.argv[1]):
    try:
        main.main([cfg, out, *extra], standalone_mode=False)
        status[out] = "ok"
    except BaseException as e:  # noqa
        status[out] = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
print("@@STATUS@@" + json.dumps(status))
"""


def _mergekit_python() -> str | None:
    """mergekit-yaml's interpreter, if it is a Python that imports mergekit."""
    if MK_PYTHON is None:
        return None
    probe = subprocess.run(
        [MK_PYTHON, "-c", "import mergekit.scripts.run_yaml"], capture_output=True, text=True
    )
    return MK_PYTHON if probe.returncode == 0 else None


def _run_mergekit(jobs: list[tuple[str, str, list[str]]]) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    python = _mergekit_python()
    if python is not None:
        proc = subprocess.run(
            [python, "-c", DRIVER, json.dumps(jobs)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("@@STATUS@@"):
                return json.loads(line[len("@@STATUS@@") :])
    status = {}
    for cfg, out, extra in jobs:  # fallback: the executable, once per YAML
        proc = subprocess.run(
            [MERGEKIT_YAML, cfg, out, *extra], capture_output=True, text=True, env=env, timeout=300
        )
        status[out] = "ok" if proc.returncode == 0 else (proc.stderr or proc.stdout)[-2000:]
    return status


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict[str, Any]:
    python = _mergekit_python()
    if python is not None:
        ver = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if ver != MERGEKIT_VERSION:
            pytest.skip(f"{MERGEKIT_YAML} is mergekit {ver!r}, not {MERGEKIT_VERSION}")
    root = tmp_path_factory.mktemp("mk")
    wide = _family(root, "w_", WIDE, seed=0)
    deep = _family(root, "d_", DEEP, seed=20)
    small = _family(root, "s_", SMALL, seed=10)
    big = _family(root, "b_", BIG, seed=30)
    roberta = _roberta_family(root, seed=40)
    cases = {
        **_cases(wide),
        **_deep_cases(deep),
        **_small_cases(small),
        **_buffer_cases(roberta),
        **_stat_cases(wide),
        **_big_stat_cases(big),
    }
    jobs, info = [], {}
    for name, cfg in cases.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        extra = list(FLAGS)
        if name.startswith("stat_"):
            extra += ["--random-seed", "1234"]
        out = root / f"mk_{name}"
        jobs.append((str(path), str(out), extra))
        info[name] = {"yaml": path, "mk": out, "base": wide["base"]}
    status = _run_mergekit(jobs)
    for name in info:
        info[name]["status"] = status.get(str(info[name]["mk"]), "not run")
    return {"root": root, "cases": info, "wide": wide, "big": big}


def _taskvec(parity: dict[str, Any], name: str, seed: int | None = None) -> Path:
    case = parity["cases"][name]
    out = parity["root"] / (f"tv_{name}" if seed is None else f"tv_{name}_s{seed}")
    if not out.exists():
        tv_merge(case["yaml"], out, random_seed=seed, progress=False)
    return out


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _mergekit(parity: dict[str, Any], name: str) -> Path:
    case = parity["cases"][name]
    if case["status"] != "ok":
        pytest.fail(f"mergekit failed on {name}: {case['status']}")
    return case["mk"]


DETERMINISTIC = [
    "linear",
    "linear_unnormalized_filters",
    "task_arithmetic",
    "task_arithmetic_normalize",
    "ties",
    "ties_unnormalized_rescaled",
    "breadcrumbs",
    "breadcrumbs_ties",
    "slerp",
    "nuslerp_base",
    "nuslerp_rows",
    "nuslerp_cols",
    "multislerp",
    "multislerp_base",
    "karcher",
    "model_stock",
    "model_stock_filter_wise",
    "nearswap",
    "ram",
    "ramplus_tl",
    "sce",
    "sce_topk",
    "arcee_fusion",
    "passthrough_slices",
    "task_arithmetic_slices",
    "linear_with_base_model",
    "karcher_with_base_model",
    "deep_ties_gradients",
    "deep_slerp_gradient",
    "deep_passthrough_slices",
    "deep_task_arithmetic_slices",
    "deep_single_layer_slice_gradient",
    "roberta_ties_position_ids",
    "roberta_linear_position_ids",
]


def _param(name: str):
    if name in KNOWN:
        return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN[name]))
    return name


def _compare(mk: dict[str, torch.Tensor], tv: dict[str, torch.Tensor], tol: float) -> list[str]:
    problems = []
    if sorted(mk) != sorted(tv):
        problems.append(
            f"tensor names differ: only mergekit {sorted(set(mk) - set(tv))}, "
            f"only taskvec {sorted(set(tv) - set(mk))}"
        )
    for k in sorted(set(mk) & set(tv)):
        a, b = mk[k], tv[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{k}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        a64, b64 = a.double(), b.double()
        err = float((a64 - b64).abs().max()) / max(float(a64.abs().max()), 1e-30)
        if not math.isfinite(err) or err > tol:
            problems.append(f"{k}: relative error {err:.2e}")
    return problems


SMALL_CASES = [
    "small_ties_density_0.7",  # regression: per-model parameters once arrived as float32
    "small_breadcrumbs_default_gamma",
    "small_task_arithmetic_with_density",
]


@pytest.mark.parametrize("name", [_param(n) for n in DETERMINISTIC + SMALL_CASES])
def test_deterministic_parity(parity, name: str) -> None:
    mk_out = _mergekit(parity, name)
    tv_out = _taskvec(parity, name)
    problems = _compare(_load(mk_out), _load(tv_out), REL_TOL)
    assert not problems, f"{name}: " + "; ".join(problems[:8])


@pytest.mark.parametrize(
    ("name", "layers"), [("passthrough_slices", 3), ("deep_passthrough_slices", 5)]
)
def test_passthrough_slices_layer_count(parity, name: str, layers: int) -> None:
    mk_cfg = json.loads((_mergekit(parity, name) / "config.json").read_text())
    tv_cfg = json.loads((_taskvec(parity, name) / "config.json").read_text())
    assert mk_cfg["num_hidden_layers"] == tv_cfg["num_hidden_layers"] == layers


def test_mergekit_ran_every_case(parity) -> None:
    """Every YAML ran in mergekit (so an xfail above is a taskvec difference, not a mergekit
    failure), except `rescale: expectation`, which mergekit 0.1.5 rejects."""
    failed = {
        name: case["status"]
        for name, case in parity["cases"].items()
        if case["status"] != "ok" and not name.endswith("_expectation")
    }
    assert not failed, failed


def test_every_deterministic_mergekit_method_is_compared() -> None:
    methods = {
        "linear",
        "task_arithmetic",
        "ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "model_stock",
        "nearswap",
        "ram",
        "ramplus_tl",
        "sce",
        "passthrough",
        "arcee_fusion",
    }
    covered = {c for c in methods if any(n == c or n.startswith(c + "_") for n in DETERMINISTIC)}
    assert covered == methods


# --------------------------------------------------------------------------------------------
# DARE / DELLA: statistical parity
# --------------------------------------------------------------------------------------------


def _stats(out: dict[str, torch.Tensor], parity: dict[str, Any], cfg: dict[str, Any]):
    """(fraction of entries equal to the base, slope of merged Δ on E[Δ] = Σ wᵢτᵢ, n)."""
    base = _load(parity["wide"]["base"])
    fts = [_load(parity["wide"][f"ft{i}"]) for i in range(3)]
    weights = [m["parameters"]["weight"] for m in cfg["models"]]
    unchanged = 0
    n = 0
    num = den = 0.0
    for k, b in base.items():
        b64 = b.double()
        d = out[k].double() - b64
        e = sum(w * (ft[k].double() - b64) for w, ft in zip(weights, fts, strict=True))
        unchanged += int((d == 0).sum())
        n += d.numel()
        num += float((d * e).sum())
        den += float((e * e).sum())
    return unchanged / n, num / den, n


@pytest.mark.parametrize("method", sorted(STATISTICAL))
def test_random_method_statistical_parity(parity, method: str) -> None:
    """Same config, same --random-seed: the draws differ (different RNG streams), but the
    share of entries left at the base and the regression slope of the merged Δ on Σ wᵢτᵢ
    agree within a few standard errors (≈0.003 and ≈0.007 here)."""
    name = f"stat_{method}"
    cfg = yaml.safe_load(parity["cases"][name]["yaml"].read_text())
    mk = _load(_mergekit(parity, name))
    tv = _load(_taskvec(parity, name, seed=1234))
    f_mk, s_mk, n = _stats(mk, parity, cfg)
    f_tv, s_tv, _ = _stats(tv, parity, cfg)
    se = math.sqrt(2 * max(f_mk * (1 - f_mk), 1e-4) / n)
    assert abs(f_mk - f_tv) < 5 * se, (f_mk, f_tv, se)
    assert abs(s_mk - s_tv) < 0.05, (s_mk, s_tv)
    if method == "dare_linear":  # Bernoulli(p) + L1 rescale is unbiased up to O(1/√n)
        assert abs(s_tv - 1) < 0.05 and abs(s_mk - 1) < 0.05, (s_mk, s_tv)
    assert 0.1 < f_tv < 0.9  # an actual sparsification, not a no-op or all-zero


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_expectation_rescale_is_unbiased(parity, method: str) -> None:
    """`rescale: expectation` (the papers' 1/p) is a taskvec extension: mergekit 0.1.5's
    `rescale` is a bool and rejects it. E[merged Δ] = Σ wᵢτᵢ, so the slope is ≈ 1."""
    name = f"stat_{method}_expectation"
    assert parity["cases"][name]["status"] != "ok"
    cfg = yaml.safe_load(parity["cases"][name]["yaml"].read_text())
    _, slope, _ = _stats(_load(_taskvec(parity, name, seed=1234)), parity, cfg)
    assert abs(slope - 1) < 0.05, slope


def test_random_methods_are_reproducible_and_seed_dependent(parity) -> None:
    name = "stat_dare_ties"
    a = _load(_taskvec(parity, name, seed=1234))
    again = parity["root"] / "tv_again"
    tv_merge(parity["cases"][name]["yaml"], again, random_seed=1234, progress=False)
    other = parity["root"] / "tv_other"
    tv_merge(parity["cases"][name]["yaml"], other, random_seed=99, progress=False)
    b, c = _load(again), _load(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------
# DARE / DELLA on larger tensors: the sampling distributions agree
# --------------------------------------------------------------------------------------------
# Notation: for expert i and entry j, pᵢⱼ is mergekit's keep probability: the density d for
# DARE; d − ε + 2ε·rᵢⱼ/(n − 1) for DELLA, rᵢⱼ the 0-based rank of |τᵢⱼ| in its row of n
# (a 1-D tensor is one row). Every task-vector method keeps a merged entry unchanged only if
# every expert dropped it (the kept deltas that agree with the elected sign never cancel), so
# P(Δⱼ ≠ 0) = 1 − Πᵢ (1 − pᵢⱼ·[τᵢⱼ ≠ 0]) for dare_linear, dare_ties, della and della_linear.
# The count of changed entries of a row or tensor is then Poisson-binomial, with mean Σ P and
# variance Σ P(1 − P), whatever the RNG.

Z_MAX = 5.0  # a bound on |z| that an exact sampler breaks with probability < 1e-6
SPREAD_MAX = 8.0  # mergekit vs taskvec's seed-to-seed spread (t with 7 dof: p ≈ 1e-4)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def _keep_prob(tau: torch.Tensor, method: str) -> torch.Tensor:
    """pᵢⱼ for one task vector (see above)."""
    if not method.startswith("della"):
        return torch.full(tau.shape, BIG_DENSITY, dtype=torch.float64)
    rows = _rows(tau)
    rank = rows.abs().argsort(dim=1).argsort(dim=1).double()
    frac = rank / max(rows.shape[1] - 1, 1)
    return ((BIG_DENSITY - BIG_EPSILON) + 2 * BIG_EPSILON * frac).reshape(tau.shape)


def _big_inputs(parity: dict[str, Any], n: int):
    base = {k: v.double() for k, v in _load(parity["big"]["base"]).items()}
    fts = [_load(parity["big"][f"ft{i}"]) for i in range(n)]
    taus = [{k: ft[k].double() - b for k, b in base.items()} for ft in fts]
    return base, taus


def _changed_counts(out: dict[str, torch.Tensor], base, taus, method: str):
    """With P = P(Δⱼ ≠ 0) as above: per tensor (changed count, Σ P, Σ P(1 − P), changes where
    P = 0); the per-row z-scores of all tensors; and (count, Σ P, Σ P(1 − P)) pooled over the
    entries whose P is below / at least the median P of their tensor (DELLA's rank
    dependence: a sampler that ignored the ranks would keep too many small entries)."""
    per_tensor, row_z = {}, []
    halves = {"low": [0.0, 0.0, 0.0], "high": [0.0, 0.0, 0.0]}
    for k, b in base.items():
        dropped = torch.ones_like(b)
        for tau in taus:
            dropped *= 1 - _keep_prob(tau[k], method) * (tau[k] != 0)
        prob = _rows(1 - dropped)
        changed = _rows(out[k].double() != b).double()
        mean, var = prob.sum(1), (prob * (1 - prob)).sum(1)
        count = changed.sum(1)
        impossible = int((changed * (prob == 0)).sum())
        per_tensor[k] = (float(count.sum()), float(mean.sum()), float(var.sum()), impossible)
        ok = var > 0
        row_z.append((count[ok] - mean[ok]) / var[ok].sqrt())
        if (prob > 0).any():
            median = prob[prob > 0].median()
            for half, sel in (("low", (prob > 0) & (prob < median)), ("high", prob >= median)):
                ps = prob[sel]
                for i, v in enumerate((changed[sel].sum(), ps.sum(), (ps * (1 - ps)).sum())):
                    halves[half][i] += float(v)
    return per_tensor, torch.cat(row_z), halves


def _check_counts(tool: str, per_tensor, row_z: torch.Tensor, halves) -> list[str]:
    problems = []
    for k, (count, mean, var, impossible) in per_tensor.items():
        z = (count - mean) / math.sqrt(var) if var > 0 else 0.0
        if impossible or abs(z) > Z_MAX:
            problems.append(
                f"{tool} {k}: {count:.0f} entries changed, expected {mean:.1f} ± "
                f"{math.sqrt(var):.1f} (z = {z:.1f}); {impossible} changed that no expert changed"
            )
    for half, (count, mean, var) in halves.items():
        if var > 0 and abs(count - mean) > Z_MAX * math.sqrt(var):
            problems.append(
                f"{tool}: {count:.0f} changed among the {half}-probability entries, expected "
                f"{mean:.1f} ± {math.sqrt(var):.1f}"
            )
    r = row_z.numel()
    if abs(float(row_z.mean())) > Z_MAX / math.sqrt(r):  # rows share the expected mean
        problems.append(f"{tool}: per-row kept counts are biased (mean z {row_z.mean():.3f})")
    # and the binomial spread: Σ z² over R rows is χ²_R, mean 1 ± √(2/R)
    if abs(float(row_z.square().mean()) - 1) > Z_MAX * math.sqrt(2 / r):
        problems.append(
            f"{tool}: per-row kept counts vary {float(row_z.square().mean()):.3f}× the "
            f"binomial variance over {r} rows"
        )
    return problems


@pytest.mark.parametrize("experts", ["one", "three"])
@pytest.mark.parametrize("method", sorted(STATISTICAL))
def test_random_method_kept_fraction_is_binomial(parity, method: str, experts: str) -> None:
    """The kept (changed) fraction of every tensor, of every row and of the low- and
    high-probability halves matches the keep probabilities, within binomial error, for
    mergekit and for taskvec, and the two tools' per-tensor counts agree within the error of
    their difference."""
    name = f"stat_big_{method}_{experts}"
    base, taus = _big_inputs(parity, 1 if experts == "one" else 3)
    results = {
        "mergekit": _changed_counts(_load(_mergekit(parity, name)), base, taus, method),
        "taskvec": _changed_counts(_load(_taskvec(parity, name, seed=1234)), base, taus, method),
    }
    problems = [p for tool, r in results.items() for p in _check_counts(tool, *r)]
    for k, (c_mk, _, var, _) in results["mergekit"][0].items():
        c_tv = results["taskvec"][0][k][0]
        if var > 0 and abs(c_mk - c_tv) > Z_MAX * math.sqrt(2 * var):
            problems.append(
                f"{k}: mergekit kept {c_mk:.0f}, taskvec {c_tv:.0f} (sd {var**0.5:.1f})"
            )
    assert not problems, "; ".join(problems[:8])


def _rescale_factors(out: dict[str, torch.Tensor], base, tau) -> dict[str, tuple[float, ...]]:
    """One expert, Δ = c·m⊙τ: per tensor, the least-squares c over the kept entries, the
    worst residual |Δ − c·m⊙τ| in units of |θ₀| + |Δ|, the L1 ratio ‖τ‖₁/‖m⊙τ‖₁ of the same
    mask, and E[‖m⊙τ‖₁] = Σ pⱼ|τⱼ| and Var = Σ pⱼ(1 − pⱼ)τⱼ² (for the error of c)."""
    res = {}
    for k, b in base.items():
        d, t = out[k].double() - b, tau[k]
        m = (d != 0) & (t != 0)
        c = float((d * t)[m].sum() / t[m].square().sum())
        resid = float(((d - c * m * t).abs() / (b.abs() + d.abs() + 1e-30)).max())
        l1 = float(t.abs().sum() / (t * m).abs().sum())
        res[k] = (c, resid, l1)
    return res


@pytest.mark.parametrize("method", sorted(STATISTICAL))
def test_random_method_rescale_factor(parity, method: str) -> None:
    """With one expert each tool's output is θ₀ + c·m⊙τ with one factor c per tensor equal to
    ‖τ‖₁/‖m⊙τ‖₁ of its own mask m (mergekit's L1 rescale, ≈ 1/d), and the two tools' factors
    agree within the sampling error of ‖m⊙τ‖₁ (delta method: sd(c) ≈ c·√Var/E)."""
    name = f"stat_big_{method}_one"
    base, (tau,) = _big_inputs(parity, 1)
    mk = _rescale_factors(_load(_mergekit(parity, name)), base, tau)
    tv = _rescale_factors(_load(_taskvec(parity, name, seed=1234)), base, tau)
    problems = []
    for k in base:
        p = _keep_prob(tau[k], method) * (tau[k] != 0)
        mean = float((p * tau[k].abs()).sum())
        sd_c = tv[k][0] * math.sqrt(float((p * (1 - p) * tau[k].square()).sum())) / mean
        for tool, (c, resid, l1) in (("mergekit", mk[k]), ("taskvec", tv[k])):
            if resid > 1e-6 or abs(c - l1) > 1e-5 * l1:
                problems.append(f"{tool} {k}: c {c:.6f}, L1 ratio {l1:.6f}, residual {resid:.1e}")
        if abs(mk[k][0] - tv[k][0]) > Z_MAX * math.sqrt(2) * sd_c:
            problems.append(f"{k}: rescale mergekit {mk[k][0]:.4f} vs taskvec {tv[k][0]:.4f}")
    assert not problems, "; ".join(problems[:8])


def _moments(out: dict[str, torch.Tensor], base, taus) -> dict[str, float]:
    """Mean and standard deviation of the merged Δ (all tensors, and the largest one), and the
    slope of Δ regressed on Σ wᵢτᵢ."""
    ds = {k: out[k].double() - b for k, b in base.items()}
    allv = torch.cat([d.reshape(-1) for d in ds.values()])
    big = max(ds, key=lambda k: ds[k].numel())
    ev = torch.cat(
        [sum(w * tau[k] for w, tau in zip(BIG_WEIGHTS, taus, strict=True)).reshape(-1) for k in ds]
    )
    return {
        "mean": float(allv.mean()),
        "std": float(allv.std()),
        f"mean {big}": float(ds[big].mean()),
        f"std {big}": float(ds[big].std()),
        "slope": float((allv * ev).sum() / ev.square().sum()),
    }


@pytest.mark.parametrize("method", sorted(STATISTICAL))
def test_random_method_merged_delta_moments(parity, method: str) -> None:
    """Three experts: the mean and standard deviation of mergekit's merged Δ (and its slope on
    Σ wᵢτᵢ) lie within SPREAD_MAX standard deviations of taskvec's across seeds."""
    name = f"stat_big_{method}_three"
    base, taus = _big_inputs(parity, 3)
    mk = _moments(_load(_mergekit(parity, name)), base, taus)
    runs = [_moments(_load(_taskvec(parity, name, seed=s)), base, taus) for s in BIG_SEEDS]
    problems = []
    for key, value in mk.items():
        xs = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        mu, sd = float(xs.mean()), float(xs.std())
        bound = SPREAD_MAX * sd * math.sqrt(1 + 1 / len(runs)) + 1e-12 * abs(mu)
        if abs(value - mu) > bound:
            problems.append(f"{key}: mergekit {value:.6g}, taskvec {mu:.6g} ± {sd:.2g}")
    assert not problems, "; ".join(problems)
