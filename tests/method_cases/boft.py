"""BOFT configurations for the ONNX conformance suite (and tests/test_method_boft.py)."""

CASES = {
    # one butterfly factor: 8 blocks of 4 on q/v (in 32), 16 on down_proj (in 64), plus boft_s
    "boft-llama": dict(config="BOFTConfig", model="llama", per_row=True,
                       kwargs=dict(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # Real butterflies (boft_n_butterfly_factor > 1) are tested in test_method_boft.py only: PEFT
    # builds them with its CUDA extension and on CPU silently keeps one factor, so a CPU-made PEFT
    # checkpoint does not match its own config.
}
