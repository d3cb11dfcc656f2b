"""Which files of a model folder, besides its weights, travel into an output folder.

Everything a loader may need is copied, at any depth: config, tokenizer, generation config,
chat templates, remote-code ``*.py`` files, sentence-transformers' ``modules.json`` and module
folders (``1_Pooling/``...), READMEs other than the card taskvec writes. Left out:

* weights: files in :data:`WEIGHT_FORMATS` and weight indexes (``*.index.json``): the output
  has its own, and a copy of the input's (``tf_model.h5``, ``model.gguf``...) would contradict
  them;
* a subfolder holding weights anywhere inside (``onnx/``, ``original/``, ``checkpoint-500/``):
  an export or a copy of other weights, stale once merged. The exception is a module folder
  listed in ``modules.json`` (a sentence-transformers ``2_Dense/``): its weights belong to a
  module the merge does not touch, and the pipeline does not load without them, so the whole
  folder is copied (with the weights of the folder's own model);
* hidden files and folders, ``__pycache__``;
* at the top: ``README.md`` (replaced by the output's model card) and ``taskvec*`` files
  (taskvec's own records: ``taskvec.json``, manifest, journal).

Symbolic links are followed (the Hugging Face cache links every file to a blob): the output
holds the content under the link's name. A link that leads back into a folder being walked is
refused; a dangling link is skipped with a warning. Nothing is copied here: the listing is made
while planning, so a bad folder is refused before any work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from taskvec.errors import CheckpointError

log = logging.getLogger("taskvec")

WEIGHT_FORMATS = frozenset(
    {
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".keras",
        ".msgpack",
        ".gguf",
        ".ggml",
        ".onnx",
        ".onnx_data",
        ".tflite",
    }
)
_REPLACED = ("readme.md",)  # compared in lower case
_SKIPPED_DIRS = ("__pycache__",)


def _is_weight_file(name: str) -> bool:
    return Path(name).suffix.lower() in WEIGHT_FORMATS or name.endswith(".index.json")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _SKIPPED_DIRS


def _module_folders(root: Path) -> set[str]:
    """The module folders a sentence-transformers ``modules.json`` names (besides the root)."""
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(modules, list):
        return set()
    return {
        m["path"].strip("/")
        for m in modules
        if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"].strip("/")
    }


class _Walk:
    """Lists the files under one folder, following links and refusing link loops."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, Path] = {}

    def entries(self, folder: Path, ancestors: tuple[str, ...]) -> list[tuple[Path, str]]:
        """``(entry, kind)`` for the visible entries of ``folder``: kind ``file`` or ``dir``."""
        out = []
        for entry in sorted(folder.iterdir()):
            if _hidden(entry.name):
                continue
            if entry.is_symlink() and not entry.exists():
                log.warning("%s: dangling symbolic link, not copied", entry)
            elif entry.is_dir():
                if os.path.realpath(entry) in ancestors:
                    raise CheckpointError(f"{entry}: symbolic link loop (leads back to a parent)")
                out.append((entry, "dir"))
            elif entry.is_file():
                out.append((entry, "file"))
        return out

    def add(self, folder: Path, rel: str, ancestors: tuple[str, ...], whole: bool) -> None:
        """Add the files of ``folder`` (weights too when ``whole``) under ``rel``."""
        ancestors = (*ancestors, os.path.realpath(folder))
        for entry, kind in self.entries(folder, ancestors):
            name = f"{rel}/{entry.name}"
            if kind == "file":
                if whole or not _is_weight_file(entry.name):
                    self.files[name] = entry
            elif whole or not self.has_weights(entry, ancestors):
                self.add(entry, name, ancestors, whole)

    def has_weights(self, folder: Path, ancestors: tuple[str, ...]) -> bool:
        ancestors = (*ancestors, os.path.realpath(folder))
        return any(
            _is_weight_file(entry.name) if kind == "file" else self.has_weights(entry, ancestors)
            for entry, kind in self.entries(folder, ancestors)
        )


def side_files(root: Path) -> dict[str, Path]:
    """Relative output path (``/``-separated) -> file to copy, for the model folder ``root``
    (see the module docstring for what is left out)."""
    walk = _Walk(root)
    modules = _module_folders(root)
    top = (os.path.realpath(root),)
    for entry, kind in walk.entries(root, top):
        name = entry.name
        if kind == "file":
            if not (
                _is_weight_file(name) or name.lower() in _REPLACED or name.startswith("taskvec")
            ):
                walk.files[name] = entry
        elif name in modules or not walk.has_weights(entry, top):
            walk.add(entry, name, top, whole=name in modules)
    return walk.files
