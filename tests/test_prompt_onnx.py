"""Prompt-learning adapters in ONNX: one prompt-ready graph, adapters swapped per run and mixed per
row, generation with the KV cache; every output checked against Hugging Face PEFT. The swap, per-row
and generation tests run on every ONNX Runtime device (``ort_device``); the export-heavy ones on the
default device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TOL, tiny_llama

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError, RuntimeSessionError

peft = pytest.importorskip("peft")

IDS = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
MASK = np.ones_like(IDS)

ADAPTERS = {
    "pt": ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    "pt2": ("PromptTuningConfig", dict(num_virtual_tokens=5)),  # another length, same session
    "pre": ("PrefixTuningConfig", dict(num_virtual_tokens=2)),
    "mpt": ("MultitaskPromptTuningConfig", dict(num_virtual_tokens=3, num_tasks=2)),
    "pe": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
}


def _save_peft(name: str, directory, seed: int) -> None:
    config_name, kwargs = ADAPTERS[name]
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(), getattr(peft, config_name)(task_type="CAUSAL_LM", **kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """A base folder, PEFT adapters of every kind, and both prompt-ready exports."""
    root = tmp_path_factory.mktemp("prompt")
    tiny_llama().save_pretrained(root / "base")
    dirs = {}
    for seed, name in enumerate(ADAPTERS):
        dirs[name] = root / name
        _save_peft(name, dirs[name], seed)
    for task in ("causal-lm", "causal-lm-with-past"):
        onnx_peft.export(root / "base", root / task, adapters=dirs, task=task, mode="inputs", quiet=True)
    return root, dirs


def _peft_logits(directory, **kwargs) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    tasks = {k: torch.tensor(v) for k, v in kwargs.items()}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), **tasks).logits
    return logits[:, -IDS.shape[1]:].numpy()  # the real tokens (prompt kinds also return virtual ones)


def _greedy(directory, ids: np.ndarray, steps: int, **kwargs) -> np.ndarray:
    model = peft.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    tasks = {k: torch.tensor(v) for k, v in kwargs.items()}
    x = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=x, attention_mask=torch.ones_like(x), **tasks).logits[:, -1]
            x = torch.cat([x, last.argmax(-1, keepdim=True)], dim=1)
    return x.numpy()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_swap_per_run_equals_peft(deploy, name, ort_device):
    root, dirs = deploy
    session = onnx_peft.AdapterSession(root / "causal-lm" / "model.onnx", device=ort_device)
    assert session.input_names == ["input_ids", "attention_mask"]
    session.load_adapter("dir", dirs[name])  # a PEFT folder
    session.load_adapter("file", root / "causal-lm" / "adapters" / f"{name}.onnx_adapter")
    kwargs = {"task_ids": [1, 0]} if name == "mpt" else {}
    expected = _peft_logits(dirs[name], **kwargs)
    for adapter in ("dir", "file"):
        logits, = session.run(["logits"], {"input_ids": IDS, "attention_mask": MASK}, adapter=adapter, **kwargs)
        assert np.abs(logits - expected).max() <= TOL
    base, = session.run(["logits"], {"input_ids": IDS, "attention_mask": MASK})
    with torch.no_grad():
        reference = tiny_llama()(input_ids=torch.tensor(IDS)).logits.numpy()
    assert np.abs(base - reference).max() <= TOL
    assert np.abs(base - expected).max() > 1e-3


def test_rows_mix_adapters_of_every_kind_and_length(deploy, ort_device):
    root, dirs = deploy
    session = onnx_peft.AdapterSession(root / "causal-lm" / "model.onnx", device=ort_device)
    for name, directory in dirs.items():
        session.load_adapter(name, directory)
    rows = ["pt", None, "pre", "mpt", "pt2", "pe"]
    tasks = [0, 0, 0, 1, 0, 0]
    ids = np.arange(30).reshape(6, 5) % 60 + 3
    mask = np.ones_like(ids)
    mask[1, 3:] = 0  # right padding of the base row stays the base's business
    mixed, = session.run(["logits"], {"input_ids": ids, "attention_mask": mask}, adapter=rows, task_ids=tasks)
    for i, adapter in enumerate(rows):
        single, = session.run(["logits"], {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]},
                              adapter=adapter, task_ids=tasks[i] if adapter == "mpt" else None)
        assert np.abs(mixed[i] - single[0]).max() <= TOL, adapter


@pytest.mark.parametrize("name", ["pt", "pre", "mpt", "pe"])
def test_generate_equals_peft_greedy(deploy, name, ort_device):
    root, dirs = deploy
    session = onnx_peft.AdapterSession(root / "causal-lm-with-past" / "model.onnx", device=ort_device)
    session.load_adapter(name, root / "causal-lm-with-past" / "adapters" / f"{name}.onnx_adapter")
    kwargs = {"task_ids": [1, 0]} if name == "mpt" else {}
    expected = _greedy(dirs[name], IDS, 6, **kwargs)
    assert np.array_equal(session.generate(IDS, 6, adapter=name, **kwargs), expected)
    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), dirs[name])
    ours.base_model.generation_config.eos_token_id = None  # decode all 6 steps, as the loop above
    torch_kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
    got = ours.generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), max_new_tokens=6,
                        do_sample=False, **torch_kwargs)
    assert np.array_equal(got.numpy(), expected)


def test_generate_mixes_prompts_and_prefixes_per_row(deploy, ort_device):
    root, dirs = deploy
    session = onnx_peft.AdapterSession(root / "causal-lm-with-past" / "model.onnx", device=ort_device)
    for name, directory in dirs.items():
        session.load_adapter(name, directory)
    rows = ["pt", "pre", None, "pt2", "mpt"]
    ids = np.arange(25).reshape(5, 5) % 50 + 7
    mixed = session.generate(ids, 5, adapter=rows, task_ids=[0, 0, 0, 0, 1])
    for i, adapter in enumerate(rows):
        single = session.generate(ids[i:i + 1], 5, adapter=adapter, task_ids=1 if adapter == "mpt" else None)
        assert np.array_equal(mixed[i], single[0]), adapter


def test_in_graph_bakes_the_prompt_and_merged_is_refused(deploy, tmp_path):
    root, dirs = deploy
    model = onnx_peft.PeftModel.from_pretrained(tiny_llama(), dirs["pt"])
    path = onnx_peft.export(model, tmp_path / "baked", task="causal-lm", mode="in-graph", quiet=True)
    session = onnx_peft.AdapterSession(path)
    logits, = session.run(["logits"], {"input_ids": IDS, "attention_mask": MASK})
    assert np.abs(logits - _peft_logits(dirs["pt"])).max() <= TOL
    exported = onnx_peft.export(model, tmp_path / "own", task="causal-lm", mode="inputs", quiet=True)
    assert (exported.parent / "adapters" / "default.onnx_adapter").is_file()
    with pytest.raises(AdapterConfigError, match="no merged form"):
        onnx_peft.export(root / "base", tmp_path / "merged", adapters={"p": dirs["pre"]}, mode="merged", quiet=True)
    with pytest.raises(AdapterConfigError, match="separate models"):
        lora = tmp_path / "lora"
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(lora)
        onnx_peft.export(root / "base", tmp_path / "mix", adapters={"p": dirs["pt"], "l": lora}, mode="inputs",
                         quiet=True)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "mix").exists()


def test_bad_prompt_adapters_get_clear_errors(deploy, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    root, dirs = deploy
    session = onnx_peft.AdapterSession(root / "causal-lm" / "model.onnx")
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    for config in (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                   peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)):
        target = tmp_path / config.peft_type
        peft.get_peft_model(narrow, config).save_pretrained(target)
        with pytest.raises(IncompatibleAdapterError, match="another base model"):
            session.load_adapter("narrow", target)
    session.load_adapter("pt", dirs["pt"])
    long_ids = np.ones((1, 62), dtype=np.int64)  # 3 virtual + 62 > 64 positions
    with pytest.raises(RuntimeSessionError, match="positions, the model has 64"):
        session.run(["logits"], {"input_ids": long_ids, "attention_mask": np.ones_like(long_ids)}, adapter="pt")
    with pytest.raises(RuntimeSessionError, match="task_ids"):
        session.load_adapter("mpt", dirs["mpt"])
        session.run(["logits"], {"input_ids": IDS, "attention_mask": MASK}, adapter="mpt")
    plain = onnx_peft.export(root / "base", tmp_path / "plain", task="causal-lm", quiet=True)
    with pytest.raises(IncompatibleAdapterError, match="takes no prompt inputs"):
        onnx_peft.AdapterSession(plain).load_adapter("pt", dirs["pt"])
    past = onnx_peft.AdapterSession(root / "causal-lm-with-past" / "model.onnx")
    past.load_adapter("pre", dirs["pre"])
    feeds = {n: np.zeros((2, 2, 0, 8), np.float32) for n in past.input_names if n.startswith("past_key_values")}
    with pytest.raises(RuntimeSessionError, match="generate"):
        past.run(None, {"input_ids": IDS, "attention_mask": MASK, "position_ids": np.tile(np.arange(5), (2, 1)),
                        **feeds}, adapter="pre")


def test_inspect_convert_and_infer_speak_prompts(deploy, tmp_path, capsys):
    from onnx_peft.cli import main
    from onnx_peft.inspect import inspect_path

    root, dirs = deploy
    info = inspect_path(root / "causal-lm")
    assert info["model"]["prompt"]["hidden"] == 32 and info["model"]["prompt"]["prefix_via"] == "inputs"
    assert info["adapters"]["mpt"]["prompt"] == {"kind": "prompt", "length": 3, "tasks": 2}
    assert inspect_path(dirs["pre"])["prompt"] == {"kind": "prefix", "num_virtual_tokens": 2, "tasks": 1}
    out = tmp_path / "pre.safetensors"
    assert main(["--quiet", "convert-adapters", "--adapter", str(dirs["pre"]), "--model",
                 str(root / "causal-lm" / "model.onnx"), "-o", str(out)]) == 0
    session = onnx_peft.AdapterSession(root / "causal-lm" / "model.onnx")
    session.load_adapter("pre", out)
    logits, = session.run(["logits"], {"input_ids": IDS, "attention_mask": MASK}, adapter="pre")
    assert np.abs(logits - _peft_logits(dirs["pre"])).max() <= TOL
    capsys.readouterr()
    assert main(["infer", str(root / "causal-lm-with-past" / "model.onnx"), "--adapter", f"m={dirs['mpt']}",
                 "--input-ids", "5 6 7 8 9", "--input-ids", "10,11,12,13,14", "--max-new-tokens", "4",
                 "--task-ids", "1,0", "--quiet"]) == 0
    expected = _greedy(dirs["mpt"], IDS, 4, task_ids=[1, 0])
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"row {i} [m]: {expected[i, 5:].tolist()}" for i in range(2)]


def test_feature_extraction_on_bert_takes_prompts_and_prefixes(tmp_path):
    from transformers import BertConfig, BertModel

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4)).eval()

    bert().save_pretrained(tmp_path / "bert")
    dirs = {}
    for seed, name in enumerate(("PromptTuningConfig", "PrefixTuningConfig")):
        torch.manual_seed(seed)
        model = peft.get_peft_model(bert(), getattr(peft, name)(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param))
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])
    path = onnx_peft.export(tmp_path / "bert", tmp_path / "deploy", adapters=dirs, task="feature-extraction",
                            mode="inputs", quiet=True)
    session = onnx_peft.AdapterSession(path)
    mask = MASK.copy()
    mask[1, 4] = 0
    feeds = {"input_ids": IDS, "attention_mask": mask, "token_type_ids": np.ones_like(IDS)}
    for name, directory in dirs.items():
        session.load_adapter(name, directory)
        with torch.no_grad():  # PEFT drops token types under prompt learning (zeros)
            expected = peft.PeftModel.from_pretrained(bert(), directory).eval()(
                input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask)).last_hidden_state[:, -5:].numpy()
        hidden, = session.run(None, feeds, adapter=name)
        assert np.abs(hidden - expected)[mask == 1].max() <= TOL
    mixed, = session.run(None, feeds, adapter=list(dirs))
    for i, name in enumerate(dirs):
        single, = session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}, adapter=name)
        assert np.abs(mixed[i] - single[0])[mask[i] == 1].max() <= TOL


def test_sequence_classification_swaps_prompt_and_head(tmp_path):
    """SEQ_CLS prompt adapters train the head too: the graph gets full-weight head slots (the
    base head by default) beside the prompt inputs; PEFT folders, files and the model's own."""
    from transformers import BertConfig, BertForSequenceClassification

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_labels=3)).eval()

    bert().save_pretrained(tmp_path / "bert")
    dirs = {}
    for seed, name in enumerate(("PromptTuningConfig", "PromptEncoderConfig")):
        torch.manual_seed(seed)
        extra = {"encoder_hidden_size": 16} if name == "PromptEncoderConfig" else {}
        model = peft.get_peft_model(bert(), getattr(peft, name)(task_type="SEQ_CLS", num_virtual_tokens=3 + seed,
                                                                **extra))
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(0.3 * torch.randn_like(param))
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])
    path = onnx_peft.export(tmp_path / "bert", tmp_path / "deploy", adapters=dirs, task="sequence-classification",
                            mode="inputs", quiet=True)
    session = onnx_peft.AdapterSession(path)
    feeds = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": np.zeros_like(IDS)}
    for name, directory in dirs.items():
        with torch.no_grad():
            expected = peft.PeftModel.from_pretrained(bert(), directory).eval()(
                input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
        session.load_adapter(name, directory)
        session.load_adapter(f"{name}-file", path.parent / "adapters" / f"{name}.onnx_adapter")
        for adapter in (name, f"{name}-file"):
            logits, = session.run(None, feeds, adapter=adapter)
            assert np.abs(logits - expected).max() <= TOL
    with torch.no_grad():
        base = bert()(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    assert np.abs(session.run(None, feeds)[0] - base).max() <= TOL
    with pytest.raises(RuntimeSessionError, match="trains its own head"):
        session.run(None, feeds, adapter=list(dirs))
    own = onnx_peft.PeftModel.from_pretrained(bert(), dirs["PromptTuningConfig"])
    exported = onnx_peft.export(own, tmp_path / "own", task="sequence-classification", mode="inputs", quiet=True)
    own_session = onnx_peft.AdapterSession(exported)
    own_session.load_adapter("own", exported.parent / "adapters" / "default.onnx_adapter")
    with torch.no_grad():
        expected = own(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    assert np.abs(own_session.run(None, feeds, adapter="own")[0] - expected).max() <= TOL
    assert np.abs(own_session.run(None, feeds)[0] - base).max() <= TOL
