"""LoHa configs for the ONNX conformance suite (the ones tests/test_method_loha.py checks against PEFT).

LoHa's unmerged form is ``dense`` (D = dW^T [in, out]), which has no per-row form.
"""

CASES = {
    "loha-llama": dict(config="LoHaConfig", model="llama", per_row=False,
                       kwargs=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "loha-llama-patterns": dict(config="LoHaConfig", model="llama", per_row=False, kwargs=dict(
        r=4, alpha=6, target_modules="all-linear", exclude_modules=["o_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3})),
}
