"""BOFT configurations for the ONNX conformance suite (and tests/test_method_boft.py)."""

CASES = {
    # one butterfly factor: 8 blocks of 4 on q/v (in 32), 16 on down_proj (in 64), plus boft_s
    "boft-llama": dict(config="BOFTConfig", model="llama", per_row=True,
                       kwargs=dict(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # a real butterfly: 2 factors of 4 blocks (PEFT builds these with its CUDA extension)
    "boft-llama-butterfly": dict(config="BOFTConfig", model="llama", per_row=True,
                                 kwargs=dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                             target_modules=["k_proj", "o_proj", "up_proj"])),
}
