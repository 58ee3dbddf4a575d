"""Which modules an adapter config targets, by module path alone (no torch needed).

Same rules as PEFT so that one ``adapter_config.json`` selects the same modules here, in HF
PEFT, and in a base ONNX graph whose nodes we have mapped back to module paths.

The patterns come from downloaded files, and Python's backtracking ``re`` takes exponential time
on patterns such as ``(.*.*)*z``. Every pattern goes through :func:`checked_pattern` first: it
refuses the shapes that backtrack badly (a quantifier or alternation inside a repeated group,
backreferences, more than a few variable-length repeats) and invalid regexes, with an
AdapterConfigError naming the field. Module paths are short (< ~200 characters), so what is
left matches in at most polynomial time of low degree. Patterns PEFT users write
(``.*\\.(q|v)_proj``, ``^(?!.*vision).*q_proj$``, ``model.layers.0.mlp``) pass unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import AdapterConfigError

try:  # Python 3.11+
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 100_000
# variable-length repeats (x*, x+, x{1,9}) a pattern may hold: matching costs O(len(key) ** n) worst case
MAX_VARIABLE_REPEATS = 3
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_BACKREFS = {getattr(_sre, name) for name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE",
                                              "GROUPREF_LOC_IGNORE", "GROUPREF_UNI_IGNORE") if hasattr(_sre, name)}


def checked_pattern(pattern: Any, where: str = "pattern") -> re.Pattern[str]:
    """``pattern`` compiled, after refusing what would backtrack catastrophically or not compile.

    Raises AdapterConfigError naming ``where`` (e.g. ``"LoraConfig.rank_pattern"``) and the pattern.
    Cached: each pattern is analysed once per process.
    """
    if not isinstance(pattern, str):
        raise AdapterConfigError(f"{where}: a module pattern must be a string, got {pattern!r:.80}")
    return _checked(pattern, where)


@functools.lru_cache(maxsize=4096)
def _checked(pattern: str, where: str) -> re.Pattern[str]:
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterConfigError(f"{where}: pattern of {len(pattern)} characters is too long "
                                 f"(limit {MAX_PATTERN_CHARS})")
    try:
        parsed = _sre.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise AdapterConfigError(f"{where}: {shown!r} is not a valid regular expression ({exc})") from None
    problem = _backtracking_problem(parsed)
    if problem:
        raise AdapterConfigError(
            f"{where}: pattern {shown!r} is refused: {problem}, which can make regex matching run for hours; "
            "write it without nested repeats (e.g. '.*\\.(q_proj|v_proj)')")
    return compiled


def _backtracking_problem(parsed: Any) -> str:
    try:
        count = _variable_repeats(parsed)
    except _Refused as exc:
        return str(exc)
    if count > MAX_VARIABLE_REPEATS:
        return f"it has {count} variable-length repeats (at most {MAX_VARIABLE_REPEATS} are allowed)"
    return ""


class _Refused(Exception):
    pass


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one parsed regex item."""
    if op in _REPEATS:
        return [av[2]]
    if op == _sre.SUBPATTERN:
        return [av[-1]]
    if op == _sre.BRANCH:
        return list(av[1])
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return [av[1]]
    if op == getattr(_sre, "ATOMIC_GROUP", None):
        return [av]
    return []


def _variable_repeats(items: Any) -> int:
    """How many variable-length repeats ``items`` chains (an alternation counts its worst branch);
    raises _Refused for a repeat around a repeat or an alternation, and for backreferences."""
    count = 0
    for op, av in items:
        if op in _BACKREFS:
            raise _Refused("it uses a backreference")
        if op in _REPEATS:
            low, high, body = av
            if high > 1 and _has_choice(body):
                raise _Refused("a repeated group contains another repeat or an alternation")
            count += (low != high and high > 1) + _variable_repeats(body)  # x? only doubles the work
        elif op == _sre.BRANCH:
            count += max(_variable_repeats(branch) for branch in av[1])
        else:
            count += sum(_variable_repeats(child) for child in _children(op, av))
    return count


def _has_choice(items: Any) -> bool:
    """Whether ``items`` can match one string in several ways: it holds a repeat or an alternation."""
    for op, av in items:
        if (op in _REPEATS and av[1] > 1) or op == _sre.BRANCH:
            return True
        if any(_has_choice(child) for child in _children(op, av)):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _wrapped(template: str, pattern: str) -> re.Pattern[str]:
    """``template`` with ``{}`` replaced by ``pattern`` (which has passed checked_pattern), compiled."""
    try:
        return re.compile(template.replace("{}", pattern))
    except (re.error, OverflowError, RecursionError) as exc:  # e.g. a group named like the template's
        raise AdapterConfigError(f"module pattern {pattern!r:.80} does not work inside {template!r} ({exc})") from None


def _suffix_match(key: str, names: Sequence[str]) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def is_excluded(key: str, config: Any) -> bool:
    """True when ``key`` is excluded explicitly or belongs to a modules_to_save module."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if checked_pattern(exclude, "exclude_modules").fullmatch(key):
                return True
        elif _suffix_match(key, exclude):
            return True
    for name in getattr(config, "modules_to_save", None) or ():
        checked_pattern(name, "modules_to_save")
        if _wrapped(r"(^|.*\.){}($|\..*)", name).match(key):
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
            checked_pattern(pattern, "layers_pattern")
            match = _wrapped(r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", pattern).match(key)
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
        return checked_pattern(targets, "target_modules").fullmatch(key) is not None
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
        checked_pattern(pattern, "rank_pattern/alpha_pattern")
        if _wrapped(r"(.*\.)?({})$", pattern).match(key):
            return value
    return default
