"""Model references in a merge config that are not checkpoint paths.

* ``store:NAME``: a vector of the task-vector store (:mod:`taskvec.store`), merged as
  ``base_model + τ̂`` like a task vector saved on disk.
* ``MODEL+ADAPTER`` (mergekit's syntax): the model with a PEFT LoRA adapter merged into it,
  ``MODEL + τ_LoRA`` (see :mod:`taskvec.peft_lora`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from taskvec.algebra import AppliedModel, CheckpointModel
from taskvec.io.checkpoint import Checkpoint, open_checkpoint
from taskvec.model_view import ModelView
from taskvec.peft_lora import is_adapter, load_adapter


def open_reference(ref: str, local: Callable[[str], Path]) -> Checkpoint | None:
    """The checkpoint ``ref`` stands for when it is a special reference, else ``None``;
    ``local`` resolves a path as the config does (relative to the config's folder)."""
    from taskvec.store.equip import open_store_reference

    if (stored := open_store_reference(ref)) is not None:
        return stored
    model_ref, plus, adapter_ref = ref.rpartition("+")
    if not plus or local(ref).exists() or not is_adapter(local(adapter_ref)):
        return None
    base = CheckpointModel(open_checkpoint(local(model_ref)))
    lora = load_adapter(local(adapter_ref), base)
    return ModelView(AppliedModel(base, lora, allow_other_base=True), Path(ref))
