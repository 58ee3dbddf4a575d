"""DeLoRA configs for the ONNX conformance suite (and tests/test_method_delora.py): one rank and
lambda everywhere, and per-module ones through rank_pattern / lambda_pattern."""

CASES = {
    "delora-llama": dict(config="DeloraConfig", model="llama", per_row=True,
                         kwargs=dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "delora-llama-patterns": dict(config="DeloraConfig", model="llama", per_row=True, kwargs=dict(
        r=2, delora_lambda=4.0, rank_pattern={"down_proj": 4}, lambda_pattern={"q_proj": 9.0},
        target_modules=["q_proj", "up_proj", "down_proj"])),
}
