"""MiSS configs for the ONNX conformance suite (export / insert / merge / convert / AdapterSession /
multi-adapter). Balance mode (``init_weights=False``: a random block; True starts at zeros) becomes
``lora`` slots and has a per-row form; bat mode depends on the base weight, becomes ``dense``
slots and has no per-row form. Bat's init is zeros (a no-op): perturb ``miss_block``.
tests/test_method_miss.py runs these same configs against HF PEFT.
"""

CASES = {
    # r=5 does not divide in_features (32, 64): PEFT pads x, the selector has partial last shards
    "miss-llama": dict(config="MissConfig", model="llama", per_row=True,
                       kwargs=dict(r=5, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])),
    "miss-bat-llama": dict(config="MissConfig", model="llama", per_row=False,
                           kwargs=dict(r=8, init_weights="bat", target_modules=["q_proj", "k_proj", "down_proj"])),
}
