"""BitDelta scale distillation of stored sign vectors, checked by a plain-torch re-derivation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Family, run_cli
from test_forward_stats import TEXTS, add_tokenizer, padded
from test_foundation_errors import one_error_line

from taskvec.store.store import Store


@pytest.fixture(scope="module")
def setup(bert: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrate")
    base = add_tokenizer(Path(shutil.copytree(bert.base, root / "base")))
    ft = add_tokenizer(Path(shutil.copytree(bert.fts[0], root / "ft")))
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"base": base, "ft": ft, "data": data, "root": root}


def _output_mse(model_dir: Path, ft: Path, weights: dict[str, torch.Tensor]) -> float:
    """Mean over batches of 4 texts of the masked MSE between the hidden states of the base
    with ``weights`` in place and of the fine-tuned model."""
    from transformers import BertModel

    student, teacher = BertModel.from_pretrained(model_dir), BertModel.from_pretrained(ft)
    student.load_state_dict({**student.state_dict(), **weights})
    losses = []
    with torch.no_grad():
        for first in range(0, len(TEXTS), 4):
            ids, mask = padded(TEXTS[first : first + 4])
            a = student(input_ids=ids, attention_mask=mask).last_hidden_state
            b = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = mask.bool()
            losses.append(float((a[keep] - b[keep]).pow(2).mean()))
    return sum(losses) / len(losses)


def test_calibration_fits_the_scales_to_the_finetuned_outputs(
    bert: Family, setup: dict[str, Path]
) -> None:
    store = Store(setup["root"] / "store", create=True)
    store.add("s", setup["ft"], base=setup["base"], codec="sign")
    res = run_cli("store", "calibrate", "s", setup["ft"], setup["data"], "--as", "cal",
                  "--steps", "40", "--batch-size", "4", "--store", store.root)  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = store.get("cal")
    calibration = rec.provenance["calibration"]
    assert rec.provenance["parents"] == ["s"] and rec.codec == "sign+calibrated"
    assert calibration["loss_after"] < calibration["loss_before"]
    old, new = store.checkpoint("s"), store.checkpoint("cal")
    tau = {k: bert.ft_sds[0][k] - v for k, v in bert.base_sd.items() if v.is_floating_point()}
    weights_before, weights_after = {}, {}
    for t in rec.tensors:
        if "alpha" not in t.parts:  # kept exactly
            weights_before[t.name] = weights_after[t.name] = bert.base_sd[t.name] + tau[t.name]
            continue
        sign = torch.where(tau[t.name] >= 0, 1.0, -1.0)
        alpha_old, alpha_new = float(old.part(t.name, "alpha")), float(new.part(t.name, "alpha"))
        assert alpha_old == pytest.approx(float(tau[t.name].abs().mean()), rel=1e-5)
        weights_before[t.name] = bert.base_sd[t.name] + alpha_old * sign
        weights_after[t.name] = bert.base_sd[t.name] + alpha_new * sign
        torch.testing.assert_close(new.read(t.name), alpha_new * sign, rtol=1e-6, atol=0)
        err = float((alpha_new * sign - tau[t.name]).norm() / tau[t.name].norm())
        assert t.rel_error == pytest.approx(err, rel=1e-4)
    before = _output_mse(setup["base"], setup["ft"], weights_before)
    after = _output_mse(setup["base"], setup["ft"], weights_after)
    assert calibration["loss_before"] == pytest.approx(before, rel=1e-4)
    assert calibration["loss_after"] == pytest.approx(after, rel=1e-4)
    assert store.get("s").codec == "sign"  # the original is kept


def test_calibrating_a_vector_without_signs_is_refused(setup: dict[str, Path]) -> None:
    store = Store(setup["root"] / "store2", create=True)
    store.add("q", setup["ft"], base=setup["base"], codec="int8")
    res = run_cli("store", "calibrate", "q", setup["ft"], setup["data"], "--store", store.root)
    one_error_line(res, "no sign-coded matrix")
