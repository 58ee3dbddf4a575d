"""Greedy generation with a LoRA in ONNX Runtime, token for token equal to PyTorch.

A tiny Llama is exported with ``task="causal-lm-with-past"`` (KV cache in and out) and a LoRA
slot; ``AdapterSession.generate`` runs the decode loop with the adapter, and the same prompt
goes through ``PeftModel.generate`` in PyTorch.

    python examples/generate_with_adapter.py [--work-dir DIR] [--new-tokens N]
"""

from __future__ import annotations

import common


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = common.example_parser(__doc__)
    parser.add_argument("--new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from onnx_peft import AdapterSession, LoraConfig, PeftModel, export, get_peft_model

    work = common.work_dir(args.work_dir)
    torch.manual_seed(0)  # initializer_range 0.3: a random model whose greedy tokens vary
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
                     ).save_pretrained(work / "tiny-llama")
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(work / "tiny-llama"), config).save_pretrained(work / "chat")

    path = export(work / "tiny-llama", work / "onnx", adapters={"chat": work / "chat"}, task="causal-lm-with-past",
                  mode="inputs", overwrite=True)
    session = AdapterSession(path)
    session.load_adapter("chat", path.parent / "adapters" / "chat.onnx_adapter")
    prompt = np.array([[1, 5, 9, 3, 7]], dtype=np.int64)
    ort_tokens = session.generate(prompt, args.new_tokens, adapter="chat")[0].tolist()

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "tiny-llama"), work / "chat").eval()
    with torch.no_grad():
        torch_tokens = model.generate(torch.from_numpy(prompt), max_new_tokens=args.new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0].tolist()
    base_tokens = session.generate(prompt, args.new_tokens)[0].tolist()  # no adapter: the base model
    print(f"ORT + adapter:     {ort_tokens}")
    print(f"PyTorch + adapter: {torch_tokens}")
    print(f"ORT, no adapter:   {base_tokens}")
    print(f"match: {ort_tokens == torch_tokens}")
    return {"ort_tokens": ort_tokens, "torch_tokens": torch_tokens, "base_tokens": base_tokens,
            "match": ort_tokens == torch_tokens}


if __name__ == "__main__":
    main()
