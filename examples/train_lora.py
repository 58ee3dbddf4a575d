"""Train a LoRA on a few in-memory examples and save it in Hugging Face PEFT format.

A tiny BERT classifier learns "which sentiment word is in the text": LoRA r=8 on the encoder's
Linear layers plus the classifier head (task_type SEQ_CLS puts it in modules_to_save), trained
with ``onnx_peft.train`` (transformers.Trainer underneath). The output folder holds
adapter_config.json + adapter_model.safetensors (+ labels.json) and loads in PEFT too.

    python examples/train_lora.py [--work-dir DIR] [--epochs N]
"""

from __future__ import annotations

import random

import common


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(["the", "a", "movie", "film", "was", "is", "really"], 3)
        words.insert(rng.randrange(4), rng.choice(["good", "great", "fine"] if label == "positive" else ["bad", "awful", "sad"]))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = common.example_parser(__doc__)
    parser.add_argument("--epochs", type=float, default=8.0)
    args = parser.parse_args(argv)
    from transformers import AutoModelForSequenceClassification

    from onnx_peft import LoraConfig, get_peft_model, train

    work = common.work_dir(args.work_dir)
    base_dir = common.tiny_bert_dir(work / "tiny-bert")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "output.dense", "intermediate.dense"],
                        task_type="SEQ_CLS")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

    rows = sentiment_rows(64, seed=0)
    result = train(model, rows, work / "adapter", eval_data=rows, tokenizer=common.make_tokenizer(), quiet=True,
                   training_args={"num_train_epochs": args.epochs, "learning_rate": 3e-2, "seed": 0,
                                  "per_device_train_batch_size": 16, "report_to": "none"})
    before, after = result.metrics["eval_loss_before"], result.metrics["eval_loss_after"]
    print(f"loss before {before:.4f} -> after {after:.4f}; accuracy "
          f"{result.metrics['eval_accuracy_before']:.2f} -> {result.metrics['eval_accuracy_after']:.2f}")
    print(f"saved in PEFT format: {sorted(p.name for p in result.adapter_dir.iterdir() if p.is_file())}")
    return {"trainable_params": trainable, "total_params": total, "loss_before": before, "loss_after": after,
            "accuracy_after": result.metrics["eval_accuracy_after"]}


if __name__ == "__main__":
    main()
