"""(IA)^3 configs for the ONNX conformance suite: one per layer type (Linear, GPT-2 Conv1D), each
with input scaling (feedforward) and output scaling modules."""

CASES = {
    "ia3-llama": dict(config="IA3Config", model="llama", per_row=True, kwargs=dict(
        target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3-gpt2": dict(config="IA3Config", model="gpt2", per_row=True, kwargs=dict(
        fan_in_fan_out=True, target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
}
