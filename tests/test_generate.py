"""AdapterSession.generate: greedy decoding with the KV cache equals transformers' generate.

Tiny Llama and GPT-2 (2 layers, hidden 32, vocab 64; initializer_range 0.3 so tokens vary),
exported with task causal-lm-with-past; a batch of two prompts, the second left padded. Sessions
run on every ONNX Runtime device (``ort_device``: CPU, and CUDA where onnxruntime-gpu has it).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnx_peft.errors import RuntimeSessionError  # noqa: E402
from onnx_peft.runtime import AdapterSession, _sample  # noqa: E402

PROMPTS = np.array([[5, 9, 3, 7, 1], [0, 0, 4, 8, 2]], dtype=np.int64)
MASK = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.int64)


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def exported(request, tmp_path_factory):
    """(base model, adapter dirs, slot model path, MultiAdapter model path); one export per arch."""
    peft = pytest.importorskip("peft")
    from onnx_peft.export import export
    from onnx_peft.passes.multi_adapter import multi_adapter

    kind, folder = request.param, tmp_path_factory.mktemp(request.param)
    dirs = {}
    for i, (name, rank) in enumerate([("a", 4), ("b", 8)]):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS[kind],
                                 init_lora_weights=False, fan_in_fan_out=kind == "gpt2")
        peft.get_peft_model(tiny(kind), config).save_pretrained(folder / name)
        dirs[name] = folder / name
    path = export(tiny(kind), folder / "slots", adapters=dirs, task="causal-lm-with-past", mode="inputs", quiet=True)
    return kind, dirs, path, multi_adapter(path, folder / "multi")


def reference_model(kind, dirs, name):
    if name is None:
        return tiny(kind)
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny(kind), dirs[name]).eval()


def torch_generate(model, ids, mask, new, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)
    return out.numpy()


def test_greedy_equals_transformers_token_for_token(exported, ort_device):
    kind, dirs, path, _ = exported
    session = AdapterSession(path, device=ort_device)
    for name in dirs:
        session.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
    for name in [None, "b"]:
        model = reference_model(kind, dirs, name)
        ours = session.generate(PROMPTS, 10, attention_mask=MASK, adapter=name)
        assert np.array_equal(ours, torch_generate(model, PROMPTS, MASK, 10)), name
    # batch of one without a mask
    assert np.array_equal(session.generate(PROMPTS[:1], 6), torch_generate(tiny(kind), PROMPTS[:1], MASK[:1], 6))


def test_eos_stops_rows_and_pads(exported, ort_device):
    _, _, path, _ = exported
    session = AdapterSession(path, device=ort_device)
    free = session.generate(PROMPTS, 6, attention_mask=MASK)
    eos = int(free[0, 6])  # the second new token of row 0
    out = session.generate(PROMPTS, 6, attention_mask=MASK, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:]
    stop = list(row0).index(eos)
    assert np.all(row0[stop + 1:] == 0)
    assert np.array_equal(out[0, :5 + stop + 1], free[0, :5 + stop + 1])


def test_sampling_is_seeded_and_bad_input_is_typed(exported, ort_device):
    _, _, path, _ = exported
    session = AdapterSession(path, device=ort_device)
    one = session.generate(PROMPTS, 5, attention_mask=MASK, do_sample=True, top_k=8, top_p=0.9, temperature=0.7, seed=3)
    two = session.generate(PROMPTS, 5, attention_mask=MASK, do_sample=True, top_k=8, top_p=0.9, temperature=0.7, seed=3)
    assert np.array_equal(one, two) and one.shape == (2, 10)
    with pytest.raises(RuntimeSessionError, match="no adapter named 'x'"):
        session.generate(PROMPTS, 2, adapter="x")
    with pytest.raises(RuntimeSessionError, match="1 entries but the batch has 2"):
        session.generate(PROMPTS, 2, adapter=[None])
    with pytest.raises(RuntimeSessionError, match="integer"):
        session.generate(PROMPTS.astype(np.float32), 2)
    assert session.generate(PROMPTS[:1], 1).shape == (1, 6)


def test_sample_filters_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 200))
    assert set(_sample(logits, rng, 1.0, 2, 1.0)) <= {0, 1}
    assert set(_sample(logits, rng, 1.0, 0, 0.7)) <= {0, 1}
    assert set(_sample(logits, rng, 1.0, 0, 0.4)) == {0}


def test_not_a_decoder_is_refused(tmp_path, ort_device):
    from test_runtime import build_slot_model

    session = AdapterSession(build_slot_model(tmp_path / "m.onnx"), device=ort_device)
    with pytest.raises(RuntimeSessionError, match="not a causal LM with past"):
        session.generate(PROMPTS, 2)


def test_per_row_adapters_on_multi_adapter_decoder_equal_peft(exported, ort_device):
    kind, dirs, path, multi = exported
    session = AdapterSession(multi, device=ort_device)
    for name in dirs:
        session.load_adapter(name, path.parent / "adapters" / f"{name}.onnx_adapter")
    rows = ["a", "b", None]
    prompts = np.array([[5, 9, 3, 7, 1], [0, 0, 4, 8, 2], [0, 6, 6, 1, 3]], dtype=np.int64)
    mask = (np.arange(5)[None, :] >= np.array([[0], [2], [1]])).astype(np.int64)
    ours = session.generate(prompts, 8, adapter=rows, attention_mask=mask)
    for i, name in enumerate(rows):
        keep = mask[i] == 1
        expected = torch_generate(reference_model(kind, dirs, name), prompts[i:i + 1, keep], mask[i:i + 1, keep], 8)
        assert np.array_equal(ours[i, (~keep).sum():], expected[0]), (i, name)


def test_onnx_adapter_runs_in_ort_lora_adapter_on_extracted_model(exported, ort_providers, ort_device):
    import onnxruntime as ort

    _, _, path, _ = exported
    adapter_file = path.parent / "adapters" / "b.onnx_adapter"
    session = AdapterSession(path, device=ort_device)
    session.load_adapter("b", adapter_file)
    feeds = {"input_ids": PROMPTS, "attention_mask": MASK, "position_ids": np.maximum(np.cumsum(MASK, 1) - 1, 0)}
    for name, spec in session._inputs.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((2, spec.shape[1], 0, spec.shape[3]), np.float32)
    lora = ort.LoraAdapter()
    lora.Load(str(adapter_file))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    plain = ort.InferenceSession(str(path), providers=ort_providers)
    (theirs,) = plain.run(["logits"], feeds, options)
    (ours,) = session.run(["logits"], feeds, adapter="b")
    (base,) = session.run(["logits"], feeds)
    assert np.abs(theirs - ours).max() <= 1e-5 and np.abs(base - ours).max() > 1e-3


def test_cli_infer_generates_like_the_session(exported, capsys, ort_device):
    from onnx_peft.cli import main

    _, _, path, multi = exported
    adapter = f"a={path.parent / 'adapters' / 'a.onnx_adapter'}"
    argv = ["infer", str(multi), "--adapter", adapter, "--input-ids", "5,9,3,7,1", "--input-ids", "4,8,2",
            "--use", "a,-", "--max-new-tokens", "4", "--device", ort_device]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    session = AdapterSession(multi, device=ort_device)
    session.load_adapter("a", path.parent / "adapters" / "a.onnx_adapter")
    expected = session.generate(PROMPTS, 4, adapter=["a", None], attention_mask=MASK)[:, 5:]
    assert out == [f"row 0 [a]: {expected[0].tolist()}", f"row 1 [base]: {expected[1].tolist()}"]
    assert main(["infer", str(multi), "--input-ids", "1,x"]) == 1
    assert main(["infer", str(multi), "--text", "hi"]) == 1
    assert "--tokenizer" in capsys.readouterr().err


def test_peft_dir_loads_like_its_converted_file(exported, ort_device):
    _, dirs, path, _ = exported
    session = AdapterSession(path, device=ort_device)
    session.load_adapter("file", path.parent / "adapters" / "a.onnx_adapter")
    session.load_adapter("dir", dirs["a"])
    assert np.array_equal(session.generate(PROMPTS, 4, adapter="dir", attention_mask=MASK),
                          session.generate(PROMPTS, 4, adapter="file", attention_mask=MASK))
