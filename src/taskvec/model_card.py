"""Model cards: the ``README.md`` of an output, with the metadata the Hugging Face Hub reads.

The card is a :class:`huggingface_hub.ModelCard` whose front matter comes from a
:class:`~huggingface_hub.ModelCardData`: ``base_model`` (the inputs), ``base_model_relation:
merge`` for a merge, ``library_name`` and ``tags``. The body says how the weights were made: the
method with its formula and paper, every input with its content fingerprint
(:func:`~taskvec.io.fingerprint.content_fingerprint`), the full config and taskvec's version.

The Hub expects repo ids in ``base_model``; an input is named by one when it can be told:

* a Hugging Face cache snapshot (``…/models--org--name/snapshots/<rev>``) is ``org/name``;
* a ``config.json`` whose ``_name_or_path`` is an ``org/name`` id ending with the folder's own
  name (transformers 4 records the id a model was loaded from; a fine-tune saved from it keeps
  its base's id, hence the name check) is that id;
* otherwise the input is named as the config or the caller named it (a local path, to be
  replaced by a repo id before uploading).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from taskvec.io.checkpoint import Checkpoint
from taskvec.io.fingerprint import content_fingerprint

if TYPE_CHECKING:
    from taskvec.merge import MergePlan

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_FOLDER = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")
_ROLES = ("base", "model", "task vector", "tokenizer")


@dataclass(frozen=True)
class CardInput:
    """One input of an output: its part in it, its name as given, and its checkpoint."""

    role: str  # one of _ROLES
    name: str
    ckpt: Checkpoint

    @property
    def parent(self) -> bool:
        """Whether the output derives from this input's weights (a Hub ``base_model``)."""
        return self.role in ("base", "model")


def hub_name(name: str, ckpt: Checkpoint) -> str:
    """The input's Hub repo id when it can be told, else ``name`` (see the module docstring)."""
    root = ckpt.root.absolute()  # not resolved: the cache's links lead to its blobs
    for snapshots in root.parents:
        m = _CACHE_FOLDER.match(snapshots.parent.name)
        if snapshots.name == "snapshots" and m:
            return f"{m.group(1)}/{m.group(2)}"
    recorded = (ckpt.config or {}).get("_name_or_path")
    if (
        isinstance(recorded, str)
        and _REPO_ID.match(recorded)
        and recorded.rsplit("/", 1)[1] == ckpt.root.name
    ):
        return recorded
    return name


def _library(ckpt: Checkpoint) -> str | None:
    if (ckpt.root / "modules.json").is_file():
        return "sentence-transformers"
    return "transformers" if "model_type" in (ckpt.config or {}) else None


def _inputs_table(inputs: Sequence[CardInput]) -> str:
    rows = [
        f"| {i.role} | `{i.name}` | "
        + ("computed, no file content" if i.ckpt.derived else f"`{content_fingerprint(i.ckpt)}`")
        + " |"
        for i in inputs
    ]
    return "\n".join(
        [
            "| role | input | content fingerprint |",
            "|---|---|---|",
            *rows,
            "",
            "A content fingerprint hashes every tensor's name, shape, dtype and bytes "
            "(xxh3-128): equal fingerprints, equal weights.",
        ]
    )


def _card(
    title: str,
    inputs: Sequence[CardInput],
    relation: str | None,
    tags: list[str],
    library: Checkpoint,
    sections: list[str],
) -> str:
    """The card's text: Hub metadata from ``inputs``, then the title and ``sections``."""
    from huggingface_hub import ModelCard, ModelCardData  # 0.1 s to import: only when used

    import taskvec

    parents = list(dict.fromkeys(hub_name(i.name, i.ckpt) for i in inputs if i.parent))
    data = ModelCardData(
        base_model=parents or None,
        library_name=_library(library),
        tags=tags,
        **({"base_model_relation": relation} if relation else {}),
    )
    body = [f"# {title}", *sections, f"Made with taskvec {taskvec.__version__}."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(body) + "\n")
    return str(card)


def merge_card(plan: MergePlan, title: str, seed: int | None) -> str:
    """The card of a config-driven merge's output folder (named ``title``)."""
    cfg, method = plan.config, plan.method
    bases = {cfg.base_model, *(sl.base_model for sl in cfg.slices or [])}
    merged = {m.model for m in cfg.models or []}
    merged |= {s.model for sl in cfg.slices or [] for s in sl.sources}
    inputs = [
        CardInput(
            "base"
            if ref in bases and method.base != "unused"
            else "model"
            if ref in merged or ref in bases
            else "tokenizer",
            ref,
            ckpt,
        )
        for ref, ckpt in plan.refs.items()
    ]
    inputs.sort(key=lambda i: _ROLES.index(i.role))  # stable: the config's order in a role
    config = yaml.safe_dump(
        cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True
    )
    seeded = f"\n\nRandom seed: `{seed}`." if method.random and seed is not None else ""
    sections = [
        f"## Method: `{method.name}`\n\n{inspect.cleandoc(method.fn.__doc__ or '')}\n\n"
        f"Reference: {method.reference or 'none'}",
        f"## Inputs\n\n{_inputs_table(inputs)}",
        f"## Configuration\n\n```yaml\n{config}```{seeded}",
    ]
    return _card(
        title, inputs, "merge", ["taskvec", "merge", method.name], plan.reference, sections
    )


def expression_card(
    title: str, expression: str, inputs: Sequence[CardInput], primary: Checkpoint
) -> str:
    """The card of a model saved from a task-vector expression (``taskvec apply``, the API),
    whose config and side files are ``primary``'s."""
    sections = [
        f"## Expression\n\n`{expression}`",
        f"## Inputs\n\n{_inputs_table(inputs)}",
    ]
    relation = "merge" if sum(i.parent for i in inputs) > 1 else None
    tags = ["taskvec", "task-arithmetic", *(["merge"] if relation else [])]
    return _card(title, inputs, relation, tags, primary, sections)
