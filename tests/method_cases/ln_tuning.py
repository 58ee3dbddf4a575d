"""LN Tuning configs for the ONNX conformance suite (and tests/test_method_ln_tuning.py): Llama's
RMSNorms (exported as a decomposed Mul by the scale) and GPT-2's LayerNorms (a fused
LayerNormalization with scale and shift). Both have a per-row form."""

CASES = {
    "ln_tuning-llama": dict(config="LNTuningConfig", model="llama", per_row=True,
                            kwargs=dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])),
    "ln_tuning-gpt2": dict(config="LNTuningConfig", model="gpt2", per_row=True,
                           kwargs=dict(target_modules=["ln_1", "ln_2", "ln_f"])),
}
