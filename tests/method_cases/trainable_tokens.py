"""Trainable Tokens configs for the ONNX conformance suite (and tests/test_method_trainable_tokens.py):
Llama (untied embeddings) and GPT-2, whose lm_head shares ``wte``'s weight, so the trained rows
change the logits' columns too. Both have a per-row form (token ids padded with -1)."""

CASES = {
    "trainable_tokens-llama": dict(config="TrainableTokensConfig", model="llama", per_row=True,
                                   kwargs=dict(token_indices=[3, 5, 9, 17], target_modules=["embed_tokens"])),
    "trainable_tokens-gpt2": dict(config="TrainableTokensConfig", model="gpt2", per_row=True,
                                  kwargs=dict(token_indices=[2, 7, 11], target_modules=["wte"])),
}
