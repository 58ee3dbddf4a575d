"""OFT configurations for the ONNX conformance suite (and tests/test_method_oft.py)."""

CASES = {
    # 4 blocks of 8 on q/v (in 32), 8 blocks of 8 on down_proj (in 64); PEFT's default
    # 5-term Cayley-Neumann series
    "oft-llama": dict(config="OFTConfig", model="llama", per_row=True,
                      kwargs=dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    # r=4 blocks sharing one set of numbers, exact Cayley, COFT clipping
    "oft-llama-shared-coft": dict(config="OFTConfig", model="llama", per_row=True,
                                  kwargs=dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False,
                                              coft=True, eps=0.05, target_modules=["k_proj", "o_proj", "up_proj"])),
}
