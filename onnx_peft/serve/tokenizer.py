"""Text in, text out: the deploy folder's ``tokenizer.json`` through the ``tokenizers`` package.

Why not transformers: a deploy box runs ONNX Runtime and nothing of torch; ``tokenizers`` is
a small Rust wheel that reads the same ``tokenizer.json`` (``tokenizer.save_pretrained(DIR)``
writes it). Without one the server takes and returns token ids only.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MissingDependencyError, ModelFileError

TOKENIZER_FILE = "tokenizer.json"


class TextCodec:
    """``encode("text") -> [ids]`` (no special tokens added) and ``decode([ids]) -> "text"``."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise MissingDependencyError(f"{path} needs the tokenizers package: pip install tokenizers") from exc
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelFileError(f"{path}: tokenizers cannot read it ({exc}); save it with "
                                 "tokenizer.save_pretrained(DEPLOY_DIR)") from exc
        self.path = path
        self.eos_token_id = self._eos(path.parent)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def _eos(self, folder: Path) -> int | None:
        """The eos id named by ``tokenizer_config.json`` (``eos_token``), if the folder has one."""
        config = folder / "tokenizer_config.json"
        if not config.is_file():
            return None
        token = json.loads(config.read_text()).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        return self._tokenizer.token_to_id(token) if isinstance(token, str) else None


def open_codec(folder: Path) -> TextCodec | None:
    """The folder's tokenizer, or None when it ships none (token ids in and out)."""
    path = Path(folder) / TOKENIZER_FILE
    return TextCodec(path) if path.is_file() else None
