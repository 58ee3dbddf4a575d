"""A deploy folder opened for serving: the session, its task, its adapters, its tokenizer.

Why: ``onnx-peft export`` writes ``model.onnx``, ``export_info.json`` (the task) and
``adapters/NAME.onnx_adapter``; the server needs all of them plus one fact the folder does not
state: whether one run can mix adapters row by row. A slot model (``--mode inputs``) is turned
into a MultiAdapter model in a temporary folder at start (the ``multi-adapter`` pass), so
concurrent requests for different adapters share one run; a model whose slots have no per-row
form keeps its slots and the batcher groups rows by adapter instead.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, OnnxPeftError
from ..runtime import AdapterSession
from .tokenizer import TextCodec, open_codec

logger = logging.getLogger("onnx_peft.serve")

TASKS = ("causal-lm-with-past", "sequence-classification", "feature-extraction")


@dataclass
class Deployment:
    """What the routes serve. ``mixes_rows``: one run may hold rows of different adapters."""

    folder: Path
    session: AdapterSession
    task: str
    codec: TextCodec | None
    adapter_paths: dict[str, str]
    eos_token_id: int | None = None
    labels: dict[str | None, list[str]] = field(default_factory=dict)
    _tmp: Any = None

    @property
    def mixes_rows(self) -> bool:
        return self.session.is_multi_adapter

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def task_of(folder: Path, session: AdapterSession) -> str:
    """``export_info.json``'s task, else the one the model's inputs and outputs imply."""
    info = folder / "export_info.json"
    if info.is_file():
        try:
            task = json.loads(info.read_text()).get("task")
        except ValueError as exc:
            raise ModelFileError(f"{info}: not JSON ({exc}); re-run onnx-peft export") from exc
        if task in TASKS:
            return task
        if task is not None:
            raise ModelFileError(f"{info}: task {task!r} has no serving endpoint; serve one of {list(TASKS)} "
                                 "(export a decoder with --task causal-lm-with-past)")
    if any(n.startswith("past_key_values.") for n in session._inputs):
        return "causal-lm-with-past"
    if "last_hidden_state" in session.output_names:
        return "feature-extraction"
    outputs = {o.name: o.shape for o in session._session.get_outputs()}
    if len(outputs.get("logits") or ()) == 2:
        return "sequence-classification"
    raise ModelFileError(f"{folder}: cannot tell the model's task (no export_info.json; outputs "
                         f"{session.output_names}); export it with onnx-peft export --task ...")


def folder_adapters(folder: Path) -> dict[str, str]:
    """``adapters/NAME.onnx_adapter`` files of an export folder, by name."""
    found = sorted((folder / "adapters").glob("*.onnx_adapter")) if (folder / "adapters").is_dir() else []
    return {p.stem: str(p) for p in found}


def open_deployment(folder: str | os.PathLike, adapters: Mapping[str, str] | None = None,
                    mix_adapters: bool = True, providers: Sequence[Any] | None = None,
                    eos_token_id: int | None = None, session_options: Any = None, preload: bool = True, *,
                    device: str | None = None, provider_options: Mapping[str, Mapping[str, Any]] | None = None,
                    tf32: bool = False, strategy: str = "auto", base_session: bool | None = None) -> Deployment:
    """Open ``folder`` (``model.onnx`` + ``adapters/``) and load every adapter in it and in ``adapters``.

    ``mix_adapters``: turn a slot model into a MultiAdapter model (temporary folder) so one
    run can serve rows of different adapters; False keeps one adapter per run, and so does
    ``strategy="merge"`` (one adapter merged into the weights at a time). ``preload=False``
    only records the adapters' paths (a Ray replica loads them on demand). ``providers``,
    ``session_options``, ``device``, ``provider_options``, ``tf32``, ``strategy`` and ``base_session`` go to
    :class:`~onnx_peft.runtime.AdapterSession` as they are."""
    folder = Path(folder)
    model = folder / "model.onnx"
    if not model.is_file():
        raise ModelFileError(f"{folder}: no model.onnx; serve a folder written by onnx-peft export "
                             "(or onnx-peft multi-adapter)")
    session_args = {"providers": providers, "session_options": session_options, "device": device,
                    "provider_options": provider_options, "tf32": tf32, "strategy": strategy,
                    "base_session": base_session}
    session = AdapterSession(model, **session_args)
    task = task_of(folder, session)
    tmp = None
    mix = mix_adapters and strategy != "merge"
    if mix and not session.is_multi_adapter and session.contract.slots and session.prompt_layout is None:
        from ..passes.multi_adapter import multi_adapter

        tmp = tempfile.TemporaryDirectory(prefix="onnx-peft-serve-")
        try:
            multi = multi_adapter(model, Path(tmp.name) / "multi")
            session = AdapterSession(multi, **session_args)
        except OnnxPeftError as exc:
            logger.warning("serving %s with one adapter per run (%s)", model, exc)
            tmp.cleanup()
            tmp = None
    paths = {**folder_adapters(folder), **dict(adapters or {})}
    for name, path in paths.items() if preload else ():
        session.load_adapter(name, path)
    from ..cli.infer_cmd import label_names

    deployment = Deployment(folder, session, task, open_codec(folder), paths, eos_token_id,
                            label_names(model, paths) if task == "sequence-classification" else {}, tmp)
    if deployment.eos_token_id is None and deployment.codec is not None:
        deployment.eos_token_id = deployment.codec.eos_token_id
    return deployment
