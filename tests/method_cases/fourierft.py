"""FourierFT configs for the ONNX conformance suite: Linear (with a per-module n_frequency) and
GPT-2 Conv1D. The dense form has no per-row bank."""

CASES = {
    "fourierft-llama": dict(config="FourierFTConfig", model="llama", per_row=False, kwargs=dict(
        n_frequency=64, scaling=20.0, target_modules=["q_proj", "v_proj", "down_proj"],
        n_frequency_pattern={"down_proj": 96})),
    "fourierft-gpt2": dict(config="FourierFTConfig", model="gpt2", per_row=False, kwargs=dict(
        n_frequency=48, scaling=20.0, random_loc_seed=5, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])),
}
