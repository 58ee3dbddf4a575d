"""One fuzz case: a seed file, its mutation, one operation, and the oracles that judge it.

A case is named by ``(seed, index)`` alone: ``plan(seed, index)`` picks the target and the
operation, and ``random.Random(f"{seed}:{index}")`` drives the mutation, so any case replays
on its own (``python tests/fuzz/fuzz_run.py --seed S --case I``).

Outcomes: ``typed`` (an OnnxPeftError: the wanted refusal), ``accepted`` (finite, nothing lost)
or a failure class: ``untyped:<Exception>``, ``hang``, ``crash``, ``rss``, ``memory``,
``changed-input``, ``partial-output``, ``leftover``, ``nonfinite-output``, ``nonfinite-logits``,
``corrupt-output`` (an accepted input written out as a file that does not read back),
``accepted-unsafe`` (external data outside the folder was read or re-emitted),
``pickle-executed``.
"""

from __future__ import annotations

import hashlib
import random
import resource
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# target -> (weight, operations)
TARGETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "peft": (30, ("session", "multi", "convert", "convert_bare", "inspect", "insert", "merge")),
    "safetensors": (10, ("session", "multi", "convert", "convert_bare", "inspect")),
    "npz": (10, ("session", "multi", "convert", "convert_bare", "inspect")),
    "onnx_adapter": (10, ("session", "multi", "convert", "convert_bare", "inspect")),
    "slots": (14, ("session", "inspect", "multi_adapter", "convert")),
    "multi": (8, ("multi", "inspect")),
    "ingraph": (9, ("extract", "merge", "inspect")),
    "base": (9, ("insert", "merge", "inspect")),
}
MODEL_TARGETS = ("slots", "multi", "ingraph", "base")
RSS_LIMIT_MB = 1024


@dataclass
class Case:
    seed: int
    index: int
    target: str
    op: str

    @property
    def name(self) -> str:
        return f"{self.seed}:{self.index}:{self.target}:{self.op}"


def plan(seed: int, index: int) -> Case:
    rng = random.Random(f"plan:{seed}:{index}")
    names = list(TARGETS)
    target = rng.choices(names, weights=[TARGETS[n][0] for n in names])[0]
    return Case(seed, index, target, rng.choice(TARGETS[target][1]))


# -- case folder ------------------------------------------------------------------------------
def _copy(item: str, dest: Path) -> Path:
    """Copy a corpus item (a file, a PEFT dir, or a model with its folder) under ``dest``."""
    source = Path(item)
    if source.is_dir():
        shutil.copytree(source, dest / source.name)
        return dest / source.name
    if source.suffix == ".onnx":  # the whole model folder: data files, adapters/
        shutil.copytree(source.parent, dest / source.parent.name)
        return dest / source.parent.name / source.name
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, dest / source.name)
    return dest / source.name


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file (and a mark for folders and links) under ``root``, hidden ones too."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + str(path.readlink())
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _mutate(case: Case, rng: random.Random, target: Path, secret: Path, marker: Path) -> tuple[str, bool]:
    from fuzz_files import mutate_npz, mutate_onnx_adapter, mutate_safetensors
    from fuzz_json import mutate_json
    from fuzz_models import mutate_model

    if case.target == "peft":
        labels = []
        roll = rng.random()
        if roll < 0.55 or roll >= 0.9:
            config = target / "adapter_config.json"
            config.write_text(mutate_json(rng, config.read_text(), hot_keys=CONFIG_KEYS))
            labels.append("config")
        if roll >= 0.55 and rng.random() < 0.9:
            labels.append(mutate_safetensors(rng, target / "adapter_model.safetensors"))
        elif roll >= 0.55:  # a pickle instead of safetensors
            import pickle

            from fuzz_files import _Boom

            (target / "adapter_model.safetensors").unlink()
            (target / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Boom(str(marker))}))
            labels.append("pickle-bin")
        if rng.random() < 0.03:
            (target / rng.choice(["adapter_config.json", "adapter_model.safetensors"])).unlink(missing_ok=True)
            labels.append("file-missing")
        return "+".join(labels) or "none", False
    if case.target == "safetensors":
        return mutate_safetensors(rng, target), False
    if case.target == "npz":
        return mutate_npz(rng, target, marker), False
    if case.target == "onnx_adapter":
        return mutate_onnx_adapter(rng, target), False
    return mutate_model(rng, target, secret)


CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
               "fan_in_fan_out", "bias", "peft_type", "lora_dropout", "layers_to_transform", "layers_pattern",
               "modules_to_save", "exclude_modules", "task_type", "init_lora_weights", "use_qalora",
               "trainable_token_indices", "lora_bias", "layer_replication", "target_parameters", "auto_mapping"]


# -- operations --------------------------------------------------------------------------------
def _feeds(session: Any, batch: int) -> dict[str, np.ndarray]:
    from onnx_peft.runtime import example_feeds

    return example_feeds(session, batch=batch, sequence=5, seed=0)


def _finite_logits(outputs: list[Any]) -> None:
    for output in outputs:
        array = np.asarray(output)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise _Failure("nonfinite-logits", f"run output {array.shape} has NaN/inf")


def run_op(case: Case, rng: random.Random, inputs: dict[str, Path], target: Path, out: Path) -> list[Path]:
    """Run ``case.op``; return the output paths it declared (they must exist together)."""
    from onnx_peft.convert import convert_adapters
    from onnx_peft.inspect import inspect_path, render_text
    from onnx_peft.passes import extract_adapters, insert_adapters, merge_adapters, multi_adapter
    from onnx_peft.runtime import AdapterSession

    op = case.op
    adapter = inputs["adapter"]
    if op in ("session", "multi"):
        session = AdapterSession(inputs["multi" if op == "multi" else "slots"])
        session.load_adapter("x", adapter)
        rows = ["x", None] if op == "multi" else "x"
        outputs = session.run(None, _feeds(session, 2), adapter=rows)
        if _largest_value(adapter) <= SANE_MAGNITUDE:
            _finite_logits(outputs)
        return []
    if op in ("convert", "convert_bare"):
        output = out.parent / f"out.{rng.choice(['onnx_adapter', 'safetensors', 'npz'])}"
        convert_adapters(adapter, inputs["slots"] if op == "convert" else None, output_path=output)
        return [output]
    if op == "inspect":
        render_text(inspect_path(target))
        return []
    if op == "insert":
        return [insert_adapters(inputs["base"], {"a": adapter}, out).parent]
    if op == "merge":
        as_file = rng.random() < 0.5
        output = out.parent / "merged.onnx" if as_file else out
        source = target if case.target == "ingraph" else inputs["base"]
        written = merge_adapters(source, output, adapter_dir=None if case.target == "ingraph" else adapter)
        return [written, written.with_name(written.name + ".data")] if as_file else [out]
    if op == "extract":
        extract_adapters(target, out)
        return [out]
    if op == "multi_adapter":
        multi_adapter(target, out)
        return [out]
    raise AssertionError(f"unknown op {op}")  # the fuzzer's own bug, reported as such


SANE_MAGNITUDE = 1e4  # adapters with larger (finite) weights may overflow a run: garbage in, not a library bug


def _largest_value(adapter: Path) -> float:
    """The largest |weight| of an accepted adapter (a flipped exponent bit gives 1e38, finite)."""
    from onnx_peft.formats import load_adapter_file, read_peft_adapter

    tensors = read_peft_adapter(adapter)[1] if adapter.is_dir() else load_adapter_file(adapter)[0]
    return max((float(np.abs(a.astype(np.float64)).max()) for a in tensors.values() if a.size and a.dtype.kind == "f"),
               default=0.0)


def _nonfinite_tensors(model: Path) -> set[str]:
    """Initializers of a mutated input model that are already NaN/inf (passed through, not created)."""
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(model))
        return {t.name for t in proto.graph.initializer if t.data_type in (1, 10, 11, 16)
                and not np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()}
    except Exception:  # noqa: BLE001 - an unreadable model has nothing to pass through
        return set()


class _Failure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def _written_finite(paths: list[Path], excused: set[str] = frozenset()) -> None:
    """Every float tensor an accepted operation wrote is finite (``excused``: NaN/inf already in the input)."""
    import onnx
    from onnx import numpy_helper

    from onnx_peft.formats import ADAPTER_FILE_SUFFIXES, load_adapter_file

    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        tensors: dict[str, np.ndarray] = {}
        try:
            if file.suffix in ADAPTER_FILE_SUFFIXES:
                tensors = load_adapter_file(file)[0]
            elif file.suffix == ".onnx":
                model = onnx.load(str(file))
                tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        except Exception as exc:  # an accepted input written out as a file nobody can read back
            raise _Failure("corrupt-output", f"{file.name}: {type(exc).__name__}: {str(exc)[:200]}") from exc
        for name, array in tensors.items():
            if array.dtype.kind == "f" and name not in excused and not np.isfinite(array).all():
                raise _Failure("nonfinite-output", f"{file.name}: tensor {name} has NaN/inf")


# -- one case, judged ---------------------------------------------------------------------------
def run_case(case: Case, corpus: dict[str, str], work: Path, reraise: bool = False) -> dict[str, Any]:
    """Build, mutate, run and judge ``case`` in ``work/case_<index>``; a JSON-ready report.

    ``reraise``: raise an untyped exception after judging (the repro command shows its traceback)."""
    from onnx_peft.errors import OnnxPeftError

    rng = random.Random(f"{case.seed}:{case.index}")
    root = work / f"case_{case.index}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    secret = root / "secret.bin"
    secret.write_bytes(np.arange(64, dtype=np.float32).tobytes())
    marker = root / "PICKLE_RAN"
    inputs_root = root / "in"
    inputs = {"slots": _copy(corpus["slots"], inputs_root / "slots_model"),
              "multi": _copy(corpus["multi"], inputs_root / "multi_model"),
              "base": _copy(corpus["base"], inputs_root / "base_model")}
    adapter_item = case.target if case.target in ("peft", "safetensors", "npz", "onnx_adapter") else \
        rng.choice(["peft", "onnx_adapter"]) if case.op in ("convert", "insert", "merge") else "onnx_adapter"
    if case.op in ("insert", "merge") or (case.op == "convert" and case.target == "slots"):
        adapter_item = "peft"
    inputs["adapter"] = _copy(corpus[adapter_item], inputs_root / "adapter")
    if case.target == "ingraph":
        inputs["ingraph"] = _copy(corpus["ingraph"], inputs_root / "ingraph_model")
    target = inputs["adapter"] if case.target not in MODEL_TARGETS else inputs[case.target]
    report: dict[str, Any] = dict(asdict(case), label="?", outcome="accepted", failure=None, detail="", seconds=0,
                                  rss_mb=0)
    try:
        label, must_refuse = _mutate(case, rng, target, secret, marker)
    except Exception as exc:  # noqa: BLE001 - the fuzzer's own bug: reported, never hidden
        if reraise:
            raise
        report.update(failure="fuzzer-error", detail=f"mutation failed: {type(exc).__name__}: {str(exc)[:200]}")
        return report
    out = root / "out"
    before = _snapshot(root)
    report["label"] = label
    started = time.perf_counter()
    outputs: list[Path] = []
    failed = False
    try:
        excused = _nonfinite_tensors(target) if case.target in MODEL_TARGETS else set()
        outputs = run_op(case, rng, inputs, target, out)
        if must_refuse:
            raise _Failure("accepted-unsafe", "external data outside the model folder was accepted")
        _written_finite(outputs, excused)
    except _Failure as exc:
        report.update(failure=exc.kind, detail=str(exc))
    except OnnxPeftError as exc:
        failed = True
        report.update(outcome="typed:" + type(exc).__name__, detail=str(exc)[:300])
    except MemoryError:
        failed = True
        report.update(failure="memory", detail="MemoryError under the address-space limit")
    except BaseException as exc:  # noqa: BLE001 - every other exception is the finding
        failed = True
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames) if "onnx_peft" in f.filename),
                     "?")
        report.update(failure=f"untyped:{type(exc).__name__}", detail=f"{where} {str(exc)[:300]}")
        if reraise:
            raise
    report["seconds"] = round(time.perf_counter() - started, 3)
    _judge_files(report, root, before, out, outputs, failed, marker)
    report["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if report["failure"] is None and report["rss_mb"] > RSS_LIMIT_MB:
        report.update(failure="rss", detail=f"peak RSS {report['rss_mb']} MB")
    if report["failure"] is None:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _judge_files(report: dict[str, Any], root: Path, before: dict[str, str], out: Path, outputs: list[Path],
                 failed: bool, marker: Path) -> None:
    after = _snapshot(root)
    declared = [str(p.relative_to(root)) for p in outputs] + [str(out.relative_to(root))]

    def is_output(key: str) -> bool:
        return any(key == d or key.startswith(d + "/") for d in declared)

    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before)
    problem = None
    if marker.exists():
        problem = ("pickle-executed", "a pickle in the input was unpickled")
    elif changed:
        problem = ("changed-input", f"changed or removed: {changed[:3]}")
    elif failed and added:
        problem = ("partial-output", f"left after the failure: {added[:3]}")
    elif not failed and any(not is_output(k) for k in added):
        problem = ("leftover", f"beside the outputs: {[k for k in added if not is_output(k)][:3]}")
    if problem and report["failure"] is None:
        report.update(failure=problem[0], detail=problem[1])
