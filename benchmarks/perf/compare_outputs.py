"""Compare two merged checkpoints tensor by tensor (e.g. taskvec's and mergekit's output).

Reports, over all tensors: the names missing on either side, shape or dtype mismatches,
the largest absolute difference, the relative L2 error ‖a − b‖ / ‖b‖ of the whole model,
and the fraction of elements that are bit-identical. Streams one tensor at a time.

    python benchmarks/perf/compare_outputs.py OUT_A OUT_B
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the shard holding it."""
    out: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[name] = shard
    return out


def compare(a: Path, b: Path, base: Path | None = None) -> dict[str, Any]:
    """Differences of ``a`` from ``b``; with ``base``, also relative to ``b``'s task vector
    ``b − base`` (the part a merge changes, ~1 % of the weights here)."""
    fa, fb = tensor_files(a), tensor_files(b)
    f0 = tensor_files(base) if base is not None else {}
    common = sorted(set(fa) & set(fb))
    res: dict[str, Any] = {
        "only_in_a": sorted(set(fa) - set(fb)),
        "only_in_b": sorted(set(fb) - set(fa)),
        "mismatched": [],
        "tensors_compared": 0,
        "max_abs_diff": 0.0,
        "max_abs_diff_tensor": None,
        "rel_l2": 0.0,
        "identical_fraction": 0.0,
    }
    diff_sq = 0.0
    ref_sq = 0.0
    tv_sq = 0.0
    same = 0
    total = 0
    worst_rel = 0.0
    for name in common:
        with safe_open(str(fa[name]), framework="pt") as f:
            ta = f.get_tensor(name)
        with safe_open(str(fb[name]), framework="pt") as f:
            tb = f.get_tensor(name)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            res["mismatched"].append(
                {
                    "name": name,
                    "a": [list(ta.shape), str(ta.dtype)],
                    "b": [list(tb.shape), str(tb.dtype)],
                }
            )
            continue
        same += int((ta == tb).sum())
        total += ta.numel()
        d = ta.float() - tb.float()
        diff_sq += float(d.double().pow(2).sum())
        t_sq = float(tb.double().pow(2).sum())
        ref_sq += t_sq
        m = float(d.abs().max()) if d.numel() else 0.0
        if m > res["max_abs_diff"]:
            res["max_abs_diff"] = m
            res["max_abs_diff_tensor"] = name
        if t_sq > 0:
            worst_rel = max(worst_rel, math.sqrt(float(d.double().pow(2).sum()) / t_sq))
        if name in f0:
            with safe_open(str(f0[name]), framework="pt") as f:
                t0 = f.get_tensor(name)
            if t0.shape == tb.shape:
                tv_sq += float((tb.double() - t0.double()).pow(2).sum())
        res["tensors_compared"] += 1
    res["rel_l2"] = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    if base is not None:
        # ‖a − b‖ / ‖b − base‖: the disagreement measured against what the merge changed
        res["rel_l2_task_vector"] = math.sqrt(diff_sq / tv_sq) if tv_sq else None
    res["worst_tensor_rel_l2"] = worst_rel
    res["identical_fraction"] = same / total if total else 0.0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--base", type=Path, help="also report the error relative to b − base")
    args = ap.parse_args(argv)
    print(json.dumps(compare(args.a, args.b, args.base), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
