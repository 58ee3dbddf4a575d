"""Mapping an adapter's module paths onto the module paths a graph's nodes carry.

Graphs exported from a wrapper, a bare backbone or another tool name the same layers with
other prefixes; one prefix rewrite, voted by every adapter module, maps them all (never one
that changes a layer number). Used by insert, merge and quantize_base.
"""

from __future__ import annotations

from collections.abc import Iterable


def match_module(module: str, known: Iterable[str]) -> str | None:
    """The graph's path for one adapter module path (:func:`map_modules` on that module alone):
    the same path, else the one path that shares its longest dotted tail."""
    return map_modules([module], known)[module]


def map_modules(modules: Iterable[str], known: Iterable[str]) -> dict[str, str | None]:
    """The graph's path for each adapter module path, by structure: one prefix rewrite for all.

    A graph exported from a wrapper (``torch.onnx.export`` of a module whose attribute ``m`` holds
    the Llama) names ``model.layers.0.mlp.down_proj`` as ``m.model.layers.0.mlp.down_proj``; a bare
    ``LlamaModel`` as ``layers.0.mlp.down_proj``; a wrapper of the inner model as
    ``m.layers.0...``. Each pair (adapter path, graph path) sharing a dotted tail proposes the
    rewrite "replace adapter prefix P by graph prefix Q"; the rewrite mapping the most adapter
    modules wins (exact names when they all exist), and every module maps through it, so
    ``layers.5.q_proj`` never lands on a one-layer graph's ``layers.0.q_proj`` just because the
    tail matches (rewrites of numbered parts are not proposed at all). A module the winning rewrite misses keeps its exact name if the graph has it,
    else None (the caller names it in its error). A tie between rewrites maps nothing.
    """
    known_set = set(known)
    modules = list(dict.fromkeys(modules))
    if all(m in known_set for m in modules):
        return {m: m for m in modules}
    by_last: dict[str, list[list[str]]] = {}
    for path in known_set:
        parts = path.split(".")
        by_last.setdefault(parts[-1], []).append(parts)
    votes: dict[tuple[str, str], int] = {}
    for module in modules:
        parts = module.split(".")
        proposed = set()
        for other in by_last.get(parts[-1], []):
            tail = _common_tail(parts, other)
            old, new = parts[:-tail], other[:-tail]
            if not any(p.isdigit() for p in old + new):  # layers.5 -> layers.0 is another layer
                proposed.add((".".join(old), ".".join(new)))
        for rewrite in proposed:
            votes[rewrite] = votes.get(rewrite, 0) + 1
    # most modules mapped first, then the least rewritten (the longest shared tails)
    ranked = sorted((-count, _parts(old) + _parts(new), old, new) for (old, new), count in votes.items())
    if not ranked or (len(ranked) > 1 and ranked[0][:2] == ranked[1][:2]):
        return {m: m if m in known_set else None for m in modules}
    _, _, old, new = ranked[0]
    mapped: dict[str, str | None] = {}
    for module in modules:
        target = _rewrite(module, old, new)
        mapped[module] = target if target in known_set else (module if module in known_set else None)
    return mapped


def _parts(prefix: str) -> int:
    return len(prefix.split(".")) if prefix else 0


def _common_tail(a: list[str], b: list[str]) -> int:
    """How many trailing dotted parts ``a`` and ``b`` share (at most all but nothing of either)."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _rewrite(module: str, old: str, new: str) -> str | None:
    """``module`` with its leading ``old`` parts replaced by ``new`` (None if it lacks them)."""
    if old and not (module == old or module.startswith(old + ".")):
        return None
    rest = module[len(old):].lstrip(".") if old else module
    return ".".join(p for p in (new, rest) if p)
