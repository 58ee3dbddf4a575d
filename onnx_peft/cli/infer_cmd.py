"""``onnx-peft infer MODEL.onnx --adapter NAME=FILE ... (--input-ids 1,2,3 | --text TEXT --tokenizer DIR)``.

Decoders exported with past key/values generate (greedy unless ``--sample``); other models
run once and print each output's shape and first values. ``--use`` picks the adapter: one name
for the batch, or one per row (``--use a,b,-``; ``-`` = no adapter) on MultiAdapter models.

Classifiers also print each row's class by name when a labels file (``labels.json`` as
``onnx-peft train`` writes it) is found for the row's adapter: ``DIR/labels.json`` for a PEFT
adapter dir, ``NAME.labels.json`` beside an adapter file ``NAME.onnx_adapter``, else
``labels.json`` beside the model (a merged or in-graph export of one adapter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..checkpoint import read_label_names
from ..errors import CheckpointError, MissingDependencyError, RuntimeSessionError
from .args import add_session_flags, parse_named_paths, session_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="model to run (with adapter slots, or any ONNX model)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                        help="load an adapter (.onnx_adapter, .safetensors or PEFT dir); repeatable")
    parser.add_argument("--use", metavar="NAME[,NAME|-...]",
                        help="adapter for the batch, or one per row; default: the first --adapter, '-' = base")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-ids", action="append", metavar="1,2,3",
                        help="token ids of one row, separated by commas or spaces; repeatable")
    source.add_argument("--text", action="append", metavar="TEXT", help="prompt of one row (needs --tokenizer)")
    parser.add_argument("--tokenizer", metavar="DIR", help="local transformers tokenizer folder for --text")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (decoders; default: 20)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    parser.add_argument("--eos-token-id", type=int, default=None, help="stop a row at this token id")
    parser.add_argument("--task-ids", metavar="T[,T...]",
                        help="task id of a multitask prompt adapter: one for the batch, or one per row")
    add_session_flags(parser)


def _tokenizer(directory: str | None):
    if directory is None:
        raise RuntimeSessionError("--text needs --tokenizer DIR (a local transformers tokenizer folder)")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError("--text needs transformers: pip install onnx-peft[torch]") from exc
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise RuntimeSessionError(f"{directory}: cannot load a tokenizer ({exc})") from exc


def _rows(args: argparse.Namespace, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[batch, length]`` left padded with 0, and the attention mask."""
    if args.text:
        rows = [tokenizer(text)["input_ids"] for text in args.text]
    else:
        try:
            rows = [[int(t) for t in line.replace(",", " ").split()] for line in args.input_ids]
        except ValueError as exc:
            raise RuntimeSessionError(f"--input-ids takes integers separated by commas or spaces ({exc})") from exc
    if not all(rows):
        raise RuntimeSessionError("every row needs at least one token")
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _task_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise RuntimeSessionError(f"--task-ids takes integers separated by commas ({exc})") from exc


def label_names(model: str | Path, adapters: dict[str, str]) -> dict[str | None, list[str]]:
    """Class names by adapter name (``None``: the model's own), from the labels files beside them."""
    found: dict[str | None, list[str]] = {}
    model_labels = read_label_names(Path(model).parent)
    if model_labels:
        found[None] = model_labels
    for name, path in adapters.items():
        path = Path(path)
        labels = read_label_names(path) if path.is_dir() else _read_labels_file(
            path.with_name(f"{path.stem}.labels.json"))
        if labels:
            found[name] = labels
    return found


def _read_labels_file(path: Path) -> list[str] | None:
    """The names in ``path`` (``labels.json``'s format, see checkpoint.read_label_names), or None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        id2label = data["id2label"] if isinstance(data, dict) else dict(enumerate(data))
        return [id2label[key] for key in sorted(id2label, key=int)]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a labels file ({exc}); expected {{\"id2label\": {{\"0\": ...}}}}") from exc


def _print_classes(logits: np.ndarray, adapter: str | list[str | None] | None,
                   labels: dict[str | None, list[str]]) -> None:
    """``row 0 [sentiment]: positive  (negative -1.20, positive 2.31, ...)`` for each row whose
    adapter (or, with none, the model) has labels of the logits' width."""
    for i, row in enumerate(logits):
        name = adapter[i] if isinstance(adapter, list) else adapter
        names = labels.get(name, labels.get(None)) if name is not None else labels.get(None)
        if names is None or len(names) != len(row):
            continue
        scores = ", ".join(f"{n} {v:.2f}" for n, v in zip(names, row))
        tag = f" [{name}]" if name is not None else ""
        print(f"row {i}{tag}: {names[int(np.argmax(row))]}  ({scores})")


def run(args: argparse.Namespace) -> int:
    from ..runtime import AdapterSession

    session = AdapterSession(args.model, **session_kwargs(args))
    names = []
    adapters = parse_named_paths(args.adapter)
    for name, path in adapters.items():
        session.load_adapter(name, path)
        names.append(name)
    tokenizer = _tokenizer(args.tokenizer) if args.text else None
    ids, mask = _rows(args, tokenizer)
    if args.use is None:
        adapter = names[0] if names else None
    else:
        chosen = [None if u in ("-", "") else u for u in args.use.split(",")]
        adapter = chosen[0] if len(chosen) == 1 else chosen
    tasks = _task_ids(args.task_ids)
    if session._decoder_io()[0]:
        out = session.generate(ids, args.max_new_tokens, adapter=adapter, do_sample=args.sample,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               eos_token_id=args.eos_token_id, attention_mask=mask, seed=args.seed,
                               task_ids=tasks)
        for i, row in enumerate(out):
            new = row[ids.shape[1]:].tolist()
            label = adapter[i] if isinstance(adapter, list) else adapter
            text = f"  {tokenizer.decode(new)!r}" if tokenizer is not None else ""
            print(f"row {i} [{label or 'base'}]: {new}{text}")
        return 0
    feeds = {"input_ids": ids}
    extra = {"attention_mask": mask, "token_type_ids": np.zeros_like(ids),
             "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    feeds.update({k: v for k, v in extra.items() if k in session._inputs})
    outputs = session.run(None, feeds, adapter=adapter, task_ids=tasks)
    labels = label_names(args.model, adapters)
    for name, value in zip(session.output_names, outputs):
        flat = np.asarray(value).reshape(-1)[:6]
        print(f"{name} {list(np.shape(value))}: {np.array2string(flat, precision=5)}")
        if name == "logits" and np.ndim(value) == 2 and labels:
            _print_classes(np.asarray(value), adapter, labels)
    return 0
