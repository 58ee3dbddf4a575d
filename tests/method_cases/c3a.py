"""C3A configs for the ONNX conformance suite: Linear only (as PEFT), with a per-module block
size. The dense form has no per-row bank."""

CASES = {
    "c3a-llama": dict(config="C3AConfig", model="llama", per_row=False, kwargs=dict(
        block_size=16, target_modules=["q_proj", "v_proj", "down_proj"], block_size_pattern={"down_proj": 32})),
}
