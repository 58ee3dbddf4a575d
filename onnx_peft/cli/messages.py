"""Errors as the one line the CLI prints, in the flags the user types.

Why: the library's messages speak to Python callers (``mode='inputs'``, ``adapter_dir=...``,
``call load_adapter first``); a CLI user never wrote those. :func:`one_line` rewrites the
Python terms into the command's flags, maps a missing optional dependency to its ``pip install``
line, and folds any message onto one line.
"""

from __future__ import annotations

import re

from ..errors import MissingDependencyError, OnnxPeftError

_SESSION_COMMANDS = frozenset({"infer", "bench", "serve"})
# (pattern, replacement, commands it applies to or None for all); tried in order
_TERMS: list[tuple[str, str, frozenset[str] | None]] = [
    # insert has --in-graph, not --mode
    (r"mode='in-graph'", "--in-graph", frozenset({"insert"})),
    (r"use mode='slots'", "leave out --in-graph", frozenset({"insert"})),
    # "mode='inputs' or 'external'" -> "--mode inputs or --mode external"
    (r"\bmode='([\w-]+)'((?:,? or '[\w-]+'|, '[\w-]+')*)",
     lambda m: "--mode " + m.group(1) + re.sub(r"'([\w-]+)'", r"--mode \1", m.group(2)), None),
    (r"\bmode (?=--mode)", "", None),
    (r"\btask='([\w-]+)'((?:,? or '[\w-]+'|, '[\w-]+')*)",
     lambda m: "--task " + m.group(1) + re.sub(r"'([\w-]+)'", r"--task \1", m.group(2)), None),
    (r"adapter_dir=\.\.\. \(`--adapter DIR`\)", "--adapter DIR", None),
    (r"adapter_dir=(\.\.\.)?", "--adapter DIR", None),
    (r" ?\(adapters=\{'name': dir\} in Python\)", "", None),
    (r"pass a PeftModel or adapters=\{name: dir\}", "give --adapter NAME=DIR", None),
    (r"adapters=\{'?name'?: '?dir'?\}", "--adapter NAME=DIR", None),
    (r"adapters=(DIR|\.\.\.)?", "--adapter DIR", None),
    (r"call load_adapter first", "load it with --adapter NAME=FILE", None),
    (r"overwrite=True", "--overwrite", None),
    (r"allow_pickle=True", "--allow-pickle", None),
    (r"tokenizer=\.\.\.", "--tokenizer DIR", None),
    # the AdapterSession keywords of infer, bench and serve (onnx_peft.runtime.providers)
    (r"\b(device|strategy)[= ]'([\w-]+)'", r"--\1 \2", _SESSION_COMMANDS),
    (r"\btf32=True", "--tf32", _SESSION_COMMANDS),
    (r"\bprovider option\(s\) (.+?) are for (\w+)",
     r"--provider-option \1 is for \2 (KEY=VALUE without PROVIDER: is for cuda)", _SESSION_COMMANDS),
    (r"\bprovider option\b", "--provider-option", _SESSION_COMMANDS),
]
_TORCH_PACKAGES = {"torch", "transformers", "onnxscript", "accelerate", "safetensors.torch"}


def cli_terms(message: str, command: str | None = None) -> str:
    """Rewrite the Python terms of a library message into ``command``'s flags."""
    for pattern, replacement, commands in _TERMS:
        if commands is None or command in commands:
            message = re.sub(pattern, replacement, message)
    return re.sub(r"  +", " ", message)


def _missing_dependency(exc: ImportError) -> str:
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name in _TORCH_PACKAGES:
        return f"this command needs PyTorch and transformers ({name} is not installed): pip install onnx-peft[torch]"
    if name == "onnxruntime":
        return "this command needs ONNX Runtime: pip install onnx-peft[cpu] (or onnx-peft[gpu])"
    return f"the Python package {name or exc} is not installed ({exc})"


def one_line(exc: BaseException, command: str | None = None) -> str:
    """The message the CLI prints for ``exc``: one line, in the user's terms."""
    if isinstance(exc, ImportError) and not isinstance(exc, MissingDependencyError):
        text = _missing_dependency(exc)
    elif isinstance(exc, OnnxPeftError):
        text = cli_terms(str(exc), command)
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:  # not one of ours: say so, so the line is still actionable
        text = (f"unexpected {type(exc).__name__}: {exc} (run again with --debug for the traceback, "
                "and please report it)")
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())
