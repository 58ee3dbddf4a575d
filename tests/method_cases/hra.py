"""HRA configs for the ONNX conformance suite (export / insert / merge / convert / AdapterSession /
multi-adapter). HRA's unmerged form is ``lora`` slots (reflections folded with the base weight),
so it has a per-row form. ``init_weights=False`` gives random reflections: PEFT's default init
repeats each vector twice, which makes a fresh adapter the identity (perturb ``hra_u`` if you
use it). tests/test_method_hra.py runs these same configs against HF PEFT.
"""

CASES = {
    "hra-llama": dict(config="HRAConfig", model="llama", per_row=True,
                      kwargs=dict(r=4, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])),
    "hra-gs-llama": dict(config="HRAConfig", model="llama", per_row=True,
                         kwargs=dict(r=3, apply_GS=True, init_weights=False, target_modules=["q_proj", "o_proj", "up_proj"])),
}
