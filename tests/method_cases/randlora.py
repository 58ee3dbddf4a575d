"""RandLoRA configs for the ONNX conformance suite (and tests/test_method_randlora.py)."""

CASES = {
    "randlora-llama": dict(config="RandLoraConfig",
                           kwargs=dict(r=8, randlora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                           model="llama", per_row=True),
    "randlora-gpt2": dict(config="RandLoraConfig",
                          kwargs=dict(r=6, randlora_alpha=12, fan_in_fan_out=True, sparse=True,
                                      target_modules=["c_attn", "c_fc"]),
                          model="gpt2", per_row=True),
}
