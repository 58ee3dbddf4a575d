"""WaveFT configs for the ONNX conformance suite: Linear with a longer wavelet (db3) and a
per-module n_frequency, and GPT-2 Conv1D with the default Haar. The dense form has no per-row bank."""

CASES = {
    "waveft-llama": dict(config="WaveFTConfig", model="llama", per_row=False, kwargs=dict(
        n_frequency=64, scaling=5.0, wavelet_family="db3", target_modules=["q_proj", "v_proj", "down_proj"],
        n_frequency_pattern={"down_proj": 96})),
    "waveft-gpt2": dict(config="WaveFTConfig", model="gpt2", per_row=False, kwargs=dict(
        n_frequency=48, scaling=5.0, random_loc_seed=5, target_modules=["c_attn", "c_fc"])),
}
