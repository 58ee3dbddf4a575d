"""LoKr configs for the ONNX conformance suite (the ones tests/test_method_lokr.py checks against PEFT).

LoKr's unmerged form is ``dense`` (D = dW^T [in, out]), which has no per-row form. The two
cases cover whole Kronecker factors (r=4) and factors split in two (r=1, decompose_both).
"""

CASES = {
    "lokr-llama": dict(config="LoKrConfig", model="llama", per_row=False,
                       kwargs=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lokr-llama-decomposed": dict(config="LoKrConfig", model="llama", per_row=False, kwargs=dict(
        r=1, alpha=2, decompose_both=True, target_modules="all-linear", exclude_modules=["o_proj"],
        rank_pattern={"v_proj": 3}, alpha_pattern={"layers.1.mlp.down_proj": 3})),
}
