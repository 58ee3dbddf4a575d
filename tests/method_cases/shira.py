"""SHiRA configs for the ONNX conformance suite: Linear only (as PEFT), seeded random masks on
attention and MLP projections. The dense form has no per-row bank."""

CASES = {
    "shira-llama": dict(config="ShiraConfig", model="llama", per_row=False, kwargs=dict(
        r=2, random_seed=11, target_modules=["q_proj", "v_proj", "down_proj"])),
}
