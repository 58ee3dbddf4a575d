"""AdaLoRA configs for the ONNX conformance suite (and tests/test_method_adalora.py)."""

CASES = {
    "adalora-llama": dict(config="AdaLoraConfig",
                          kwargs=dict(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                      target_modules=["q_proj", "v_proj", "down_proj"]),
                          model="llama", per_row=True),
    "adalora-gpt2": dict(config="AdaLoraConfig",
                         kwargs=dict(init_r=4, target_r=2, total_step=10, lora_alpha=8, fan_in_fan_out=True,
                                     target_modules=["c_attn", "c_fc"]),
                         model="gpt2", per_row=True),
}
