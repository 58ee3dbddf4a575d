"""Which modules an adapter config targets, by module path alone (no torch needed).

Same rules as PEFT so that one ``adapter_config.json`` selects the same modules here, in HF
PEFT, and in a base ONNX graph whose nodes we have mapped back to module paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any


def _suffix_match(key: str, names: Sequence[str]) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def is_excluded(key: str, config: Any) -> bool:
    """True when ``key`` is excluded explicitly or belongs to a modules_to_save module."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif _suffix_match(key, exclude):
            return True
    for name in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){name}($|\..*)", key):
            return True
    return False


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The first numbered path segment (``model.layers.3.mlp`` -> 3), as PEFT finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(key: str, config: Any) -> bool:
    """True when the module at path ``key`` gets an adapter under ``config``.

    ``target_modules`` may be a regex string (full match), or a list of names matched
    exactly or as the last path components; ``layers_to_transform`` / ``layers_pattern``
    restrict list matches to some layer indices. "all-linear" is resolved by the tuner
    (it needs module types) before this is called.
    """
    if is_excluded(key, config):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{name}") for name in targets):
        return False
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    index = layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == indexes if isinstance(indexes, int) else index in indexes


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """Value of the first ``rank_pattern``/``alpha_pattern`` entry whose key ends ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default
