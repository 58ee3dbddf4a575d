"""VeRA configs for the ONNX conformance suite (and tests/test_method_vera.py)."""

CASES = {
    "vera-llama": dict(config="VeraConfig", kwargs=dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                       model="llama", per_row=True),
    "vera-gpt2": dict(config="VeraConfig", kwargs=dict(r=4, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
                      model="gpt2", per_row=True),
}
