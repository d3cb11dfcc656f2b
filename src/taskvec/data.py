"""Text data in the ecosystem's forms, as one interface: examples of (text, optional label).

A data source is named by a string:

- a folder saved with Hugging Face ``datasets`` (``Dataset.save_to_disk``; for a
  ``DatasetDict``, the folder of one split), read with ``datasets.load_from_disk``;
- a ``.jsonl`` / ``.json`` (JSON lines), ``.csv`` or ``.txt`` file (one example per non-empty
  line, column ``text``);
- ``module:function``, a Python callable taking no argument and returning an iterable of
  examples: strings, ``(text, label)`` pairs or mappings with the text column.

The text column is ``text`` unless named, either as ``column=`` or after the path
(``train.jsonl:sentence``). A ``label`` column (or ``label=``), when there, gives the labels
(class indices or names).
Every problem with the input (missing or empty file, missing column, wrong type) is one line,
raised by :func:`open_data` before any model is loaded.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskvec.callables import import_callable
from taskvec.errors import ConfigError

DEFAULT_COLUMN = "text"
DEFAULT_LABEL = "label"
FILE_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "text"}


class DataError(ConfigError):
    """A data source that cannot give the examples asked for."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int | str | None = None  # a class index or name


@dataclass(frozen=True)
class TextData:
    """A checked data source: its name, its column and a way to read its rows afresh."""

    name: str
    column: str
    label: str | None  # the label column, when the source has one
    _rows: Callable[[], Iterable[Any]]

    def examples(self, limit: int | None = None) -> list[Example]:
        """The first ``limit`` examples (all when None); one line if there are none."""
        rows = itertools.islice(self._rows(), limit)
        found = [self._example(i, row) for i, row in enumerate(rows)]
        if not found:
            raise DataError(f"{self.name}: no examples")
        return found

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[list[Example]]:
        """:meth:`examples` in consecutive lists of ``batch_size``."""
        found = self.examples(limit)
        for first in range(0, len(found), batch_size):
            yield found[first : first + batch_size]

    def _example(self, index: int, row: Any) -> Example:
        if isinstance(row, str):
            return Example(row)
        if isinstance(row, tuple) and len(row) == 2:
            text, label = row
        elif isinstance(row, Mapping):
            if self.column not in row:
                raise DataError(
                    f"{self.name}: example {index} has no column {self.column!r} "
                    f"(it has {', '.join(map(str, row)) or 'none'})"
                )
            text, label = row[self.column], row.get(self.label) if self.label else None
        else:
            raise DataError(
                f"{self.name}: example {index} is a {type(row).__name__}, not a text, "
                "(text, label) pair or mapping"
            )
        if isinstance(label, str) and label.lstrip("-").isdigit():  # CSV cells are strings
            label = int(label)
        if not isinstance(text, str):
            raise DataError(f"{self.name}: example {index}: text is a {type(text).__name__}")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
            raise DataError(f"{self.name}: example {index}: label {label!r} is not a class")
        return Example(text, label)


def open_data(
    source: str | os.PathLike[str], column: str | None = None, label: str | None = None
) -> TextData:
    """The data source named by ``source`` (see the module docstring), checked: the file or
    folder exists and is not empty, and has the text column (and ``label`` if named)."""
    path, named = _split(str(source))
    if column is not None and named is not None and column != named:
        raise DataError(f"{source}: names column {named!r} but column={column!r} was given")
    col = column or named or DEFAULT_COLUMN
    if path is None:
        return _callable_data(str(source), col, label)
    if path.is_dir():
        return _datasets_folder(path, col, label)
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: not a data file ({', '.join(FILE_KINDS)}) nor a datasets folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if kind == "text":
        if col != DEFAULT_COLUMN:
            raise DataError(f"{path}: a text file has one column, 'text', not {col!r}")
        return TextData(str(path), col, None, lambda: _text_lines(path))
    reader = _jsonl_rows if kind == "jsonl" else _csv_rows
    first = next(iter(reader(path)), None)
    if first is None:
        raise DataError(f"{path}: no examples")
    return TextData(
        str(path), col, _check_columns(str(path), list(first), col, label), lambda: reader(path)
    )


def _split(source: str) -> tuple[Path | None, str | None]:
    """(path, column) of ``path`` or ``path:column``; (None, None) for ``module:function``."""
    if Path(source).exists():
        return Path(source), None
    head, sep, tail = source.rpartition(":")
    if sep and Path(head).exists():
        return Path(head), tail
    dotted = head.replace(".", "").replace("_", "").isalnum()
    if sep and dotted and tail.isidentifier() and Path(head).suffix.lower() not in FILE_KINDS:
        return None, None
    raise DataError(f"{source}: no such file or folder (nor a module:function)")


def _check_columns(name: str, columns: list[str], column: str, label: str | None) -> str | None:
    """The label column to use; one line when the text column (or a named label) is missing."""
    for want in (column, label):
        if want is not None and want not in columns:
            raise DataError(f"{name}: no column {want!r}; the columns are {', '.join(columns)}")
    if label is not None:
        return label
    return DEFAULT_LABEL if DEFAULT_LABEL in columns else None


def _text_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f if line.strip())


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a JSON {type(row).__name__}, not an object")
            yield row


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def _datasets_folder(path: Path, column: str, label: str | None) -> TextData:
    if not any(path.iterdir()):
        raise DataError(f"{path}: empty folder")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a datasets folder needs the datasets package "
            "(pip install 'taskvec[data]')"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a datasets folder ({str(e).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(loaded)
        raise DataError(f"{path}: holds splits {splits}; give one split's folder ({path}/<split>)")
    if len(loaded) == 0:
        raise DataError(f"{path}: no examples")
    found = _check_columns(str(path), list(loaded.column_names), column, label)
    return TextData(str(path), column, found, lambda: iter(loaded))


def _callable_data(spec: str, column: str, label: str | None) -> TextData:
    fn = import_callable(spec, DataError)

    def rows() -> Iterable[Any]:
        got = fn()
        if isinstance(got, (str, bytes, Mapping)) or not isinstance(got, Iterable):
            raise DataError(f"{spec}: returned a {type(got).__name__}, not an iterable of examples")
        return got

    return TextData(spec, column, label or DEFAULT_LABEL, rows)
