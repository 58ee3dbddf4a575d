"""Training data from local files: ``.jsonl``, ``.json``, ``.csv`` and ``.txt``.

Torch-free and dependency-free (stdlib ``json``/``csv``), so a data problem is reported before
any model is loaded. Every failure is a :class:`DataError` that names the file, the line and
the field, and lists the fields that are there::

    train.jsonl          {"text": "great film", "label": "positive"}   one object per line
    train.json           [{"text": ..., "label": ...}, ...]            one array
    train.csv            text,label                                     header row, then rows
    train.txt            great film                                     one text per line (causal-lm)

Labels may be strings (mapped to ids in sorted order) or integers (kept as ids); a CSV label
column of digits counts as integers, so the same data in JSONL and CSV gives the same ids.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

TASKS = ("sequence-classification", "causal-lm")
SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


@dataclass
class TextData:
    """Texts and, for classification, their raw labels (str or int), in file order."""

    texts: list[str]
    labels: list[Any] | None
    source: str


@dataclass
class LabelMap:
    """Label names by id; ``id2label[i]`` names class ``i``."""

    id2label: list[str]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.id2label)}

    def ids(self, labels: Iterable[Any]) -> list[int]:
        lookup = self.label2id
        return [lookup[_label_name(label)] for label in labels]

    def to_json(self) -> dict[str, Any]:
        """The ``labels.json`` written next to a classification adapter."""
        return {"id2label": {str(i): n for i, n in enumerate(self.id2label)}, "label2id": self.label2id}


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` / ``.json`` / ``.csv`` file as dicts (``.txt``: ``{"text": line}``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported data format {suffix or '(no suffix)'!r}; use {', '.join(SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix == ".jsonl":
        records = _read_jsonl(path, text)
    elif suffix == ".json":
        records = _read_json(path, text)
    elif suffix == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        records = [{"text": line} for line in text.splitlines() if line.strip()]
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
    return records


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects")
    return data


def load_text_data(source: str | os.PathLike | Sequence[dict[str, Any]], task: str, text_field: str = "text",
                   label_field: str = "label") -> TextData:
    """Texts (and labels for ``sequence-classification``) from a file or a list of dicts."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if Path(source).suffix.lower() == ".txt":
            if task != "causal-lm":
                raise DataError(f"{name}: a .txt file holds texts only; {task} needs labels (use .jsonl or .csv)")
            text_field = "text"
        records = read_records(source)
        where = _file_line(Path(source))
    else:
        name = "data"
        records = list(source)
        if not records:
            raise DataError("data: the list has no records")
        where = _list_index
    fields = [text_field] + ([label_field] if task == "sequence-classification" else [])
    texts, labels = [], []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{name}{where(index)}: expected a dict record, got {type(record).__name__}")
        for field in fields:
            if record.get(field) in (None, ""):
                present = ", ".join(record) or "none"
                state = "is empty in" if field in record else "is missing from"
                raise DataError(f"{name}{where(index)}: field {field!r} {state} the record; fields present: {present}")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{name}{where(index)}: field {text_field!r} must be text, got {type(text).__name__}")
        texts.append(text)
        if task == "sequence-classification":
            labels.append(record[label_field])
    return TextData(texts, labels if task == "sequence-classification" else None, name)


def _file_line(path: Path):
    if path.suffix.lower() == ".csv":
        return lambda index: f":{index + 2}"  # line number; line 1 is the header
    return lambda index: f": record {index + 1}"


def _list_index(index: int) -> str:
    return f"[{index}]"


def _label_name(label: Any) -> str:
    if isinstance(label, bool):
        return str(label).lower()
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()


def build_label_map(train: TextData, eval_data: TextData | None = None) -> LabelMap:
    """Ids for the training labels; eval labels must be a subset of them.

    Integer labels (or strings of digits) keep their value as id, so ``0..n-1`` stay put;
    other labels get ids in sorted order.
    """
    assert train.labels is not None
    names = sorted({_label_name(label) for label in train.labels})
    if all(name.lstrip("-").isdigit() for name in names):
        values = sorted(int(name) for name in names)
        if values[0] < 0:
            raise DataError(f"{train.source}: integer labels must be >= 0, found {values[0]}")
        id2label = [str(i) for i in range(values[-1] + 1)]
    else:
        id2label = names
    if len(names) < 2:
        raise DataError(f"{train.source}: sequence classification needs at least 2 labels, found {names}")
    if eval_data is not None and eval_data.labels is not None:
        unseen = sorted({_label_name(label) for label in eval_data.labels} - set(id2label))
        if unseen:
            raise DataError(
                f"{eval_data.source}: labels {unseen} do not occur in {train.source} "
                f"(training labels: {id2label}); the two files must share one label set"
            )
    return LabelMap(id2label)
