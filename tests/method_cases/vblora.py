"""VB-LoRA configs for the ONNX conformance suite (and tests/test_method_vblora.py)."""

CASES = {
    "vblora-llama": dict(config="VBLoRAConfig",
                         kwargs=dict(r=4, num_vectors=16, vector_length=8, topk=2,
                                     target_modules=["q_proj", "v_proj", "down_proj"]),
                         model="llama", per_row=True),
    "vblora-gpt2": dict(config="VBLoRAConfig",
                        kwargs=dict(r=4, num_vectors=16, vector_length=16, topk=3, fan_in_fan_out=True,
                                    target_modules=["c_attn", "c_fc"]),
                        model="gpt2", per_row=True),
}
