"""JSON mutations shared by adapter_config.json, safetensors headers and model metadata.

``mutate_json(rng, text)`` returns new text: a value somewhere in the tree replaced by a hostile
one (wrong type, NaN/inf, huge, regex that backtracks, deep nesting), a key dropped or added,
or the text itself truncated / garbled. Everything is drawn from ``rng`` (a ``random.Random``),
so one seed gives one file.
"""

from __future__ import annotations

import json
import random
from typing import Any

NASTY_STRINGS = ["", "no", "yes", "true", "16", "LORA", "IA3", "LOHA", "ADALORA", "PROMPT_TUNING", "(.*.*)*z",
                 "(a|a)*z", "(", "[z-a]", ".*", "q_proj", "../../etc/passwd", "/etc/passwd", "\x00", "é" * 3,
                 "x" * 5000, "model.layers.0.self_attn.q_proj", "float32", "float16", "int64", "zeros"]
NASTY_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2, 3, 4.5, -4, 2**31, 2**63, 2**70, 1e308, -1e308,
                           float("nan"), float("inf"), float("-inf"), 1e-320, [], {}, [1], [0, 1.5], ["q_proj"],
                           [["q_proj"]], {"q_proj": 2}, {"(.*.*)*z": 2}, {"q_proj": 4.5}, {"a": {"b": [1]}},
                           [None], [-1], [2**40, 2**40], ["lora_r"], *NASTY_STRINGS]


def nasty_value(rng: random.Random) -> Any:
    if rng.random() < 0.05:  # nesting (deeper than the recursion limit: garble_text)
        depth = rng.choice([50, 300])
        return json.loads("[" * depth + "]" * depth)
    return rng.choice(NASTY_VALUES)


def _paths(tree: Any, prefix: tuple = (), limit: int = 2000) -> list[tuple]:
    """Every container path in ``tree`` (at most ``limit``), the root included."""
    found = [prefix]
    stack = [(tree, prefix)]
    while stack and len(found) < limit:
        node, path = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(child, (dict, list)):
                found.append(path + (key,))
                stack.append((child, path + (key,)))
    return found


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def mutate_tree(rng: random.Random, tree: Any, hot_keys: list[str] = ()) -> Any:
    """One structural change to the parsed JSON ``tree`` (in place where possible); returns the tree."""
    if not isinstance(tree, (dict, list)):
        return nasty_value(rng)
    node = _get(tree, rng.choice(_paths(tree)))
    action = rng.random()
    if isinstance(node, dict):
        keys = list(node)
        if hot_keys and rng.random() < 0.5:
            key = rng.choice(list(hot_keys))
        elif keys and action < 0.8:
            key = rng.choice(keys)
        else:
            key = rng.choice(["extra", "__metadata__", "", "0", "slots", "banks"])
        if keys and action < 0.2 and key in node:
            del node[key]
        else:
            node[key] = nasty_value(rng)
    elif node:
        index = rng.randrange(len(node))
        if action < 0.2:
            del node[index]
        elif action < 0.3:
            node.append(node[index])  # a duplicate entry
        else:
            node[index] = nasty_value(rng)
    else:
        node.append(nasty_value(rng))
    return tree


def garble_text(rng: random.Random, text: str) -> str:
    """Text-level damage: truncation, a flipped character, a non-object root, BOM, empty."""
    action = rng.randrange(7)
    if action == 6:  # nesting past any recursion limit, as text
        depth = rng.choice([2000, 100_000])
        return text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}" if text.endswith("}") else "[" * depth
    if action == 0 and text:
        return text[: rng.randrange(len(text))]
    if action == 1 and text:
        at = rng.randrange(len(text))
        return text[:at] + chr(rng.choice([0, 34, 44, 58, 91, 93, 123, 125, 0xFFFD])) + text[at + 1:]
    if action == 2:
        return rng.choice(["[]", "null", "1", '"text"', "[1, 2]", "{}"])
    if action == 3:
        return "\ufeff" + text
    if action == 4:
        return ""
    return text + rng.choice(["}", ",", "garbage", "\x00"])


def mutate_json(rng: random.Random, text: str, hot_keys: list[str] = (), garble: float = 0.15) -> str:
    """A hostile variant of the JSON ``text``: mostly valid JSON with wrong values."""
    if rng.random() < garble:
        return garble_text(rng, text)
    try:
        tree = json.loads(text)
    except (ValueError, RecursionError):
        return garble_text(rng, text)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        tree = mutate_tree(rng, tree, hot_keys)
    return json.dumps(tree)  # NaN / Infinity literals, as Python's json (and PEFT's) writes them
