"""OSF configs for the ONNX conformance suite (and tests/test_method_osf.py), Linear only (as
PEFT). PEFT's default effective_rank (half the rank) trains as many directions as it freezes:
its delta is cheapest as a ``dense`` slot, which has no per-row form. A high effective_rank
(8 of 10 directions frozen; down_proj's through rank_pattern) leaves a low-rank delta: ``lora``
slots of rank 2r, swappable with LoRA adapters per row."""

CASES = {
    "osf-llama": dict(config="OSFConfig", model="llama", per_row=False,
                      kwargs=dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "osf-llama-high-rank": dict(config="OSFConfig", model="llama", per_row=True, kwargs=dict(
        effective_rank=0.8, rank_pattern={"down_proj": 28}, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
}
