"""`make demo`'s job runs end to end (one epoch) on the real all-MiniLM-L6-v2 and agrees with
PyTorch; the examples then reuse its output folder."""

from test_examples import run_example

from onnx_peft.demo import TASKS, run_demo


def test_demo_trains_exports_swaps_and_mixes_then_examples_reuse_it(tmp_path):
    demo = tmp_path / "demo"
    results = run_demo(demo, epochs=1.0, rounds=3)
    for task in TASKS:
        numbers = results["tasks"][task]
        # MiniLM is a real 22.7M-parameter model: the 1e-4 bound of the ~100M class applies
        assert numbers["max_logit_diff"] <= 1e-4
        assert numbers["accuracy_ort"] == numbers["accuracy_torch"]
        assert numbers["accuracy_torch"] > numbers["accuracy_before"]
    assert results["mixed_rows_max_diff"] <= 1e-5
    for name in ("merged model (no slots)", "slots, no adapter", "slots, sentiment adapter"):
        assert results["latency_ms"][name] > 0
    assert (demo / "onnx" / "adapters" / "topic.onnx_adapter").exists()

    swapped = run_example("swap_adapters", tmp_path / "work", "--from-demo", str(demo))
    assert max(v for k, v in swapped.items() if k.startswith("max_abs_diff_")) <= 1e-4
    assert swapped["adapter_effect"] > 1e-2
