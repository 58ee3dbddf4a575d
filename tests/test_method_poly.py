"""Poly (Polytropon / MHR) against HF PEFT, on numbers: forward and greedy generation with
task_ids, checkpoints both ways, training, errors, the per-task LoRA reduction, and the ONNX path
(per-task ``lora`` slots in an AdapterSession, one task per row in a multi-adapter session).

Not in tests/method_cases: the conformance suite runs PEFT's forward without task_ids, which a
PEFT Poly model refuses; the same ONNX paths are checked here with task_ids.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import (
    TOL,
    changed_since,
    max_diff,
    peft_and_ours,
    perturb_trainable,
    saved_keys,
    snapshot,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights, save_adapter_dir
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError, OnnxPeftError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.poly import PolyConfig, task_lora
from onnx_peft.tuners.poly import PolyLayer

peft = pytest.importorskip("peft")

METHOD = method_for("POLY")
# MHR (2 splits of 2 skills), 3 tasks, on Linear layers of different in/out sizes (v_proj: 32 -> 16)
KWARGS = dict(r=4, n_tasks=3, n_skills=2, n_splits=2, target_modules=["q_proj", "v_proj", "down_proj"],
              task_type="CAUSAL_LM")
ONE_TASK = dict(KWARGS, n_tasks=1, n_splits=1, n_skills=3)
TASKS = torch.tensor([2, 0, 1])


def _pair(kwargs: dict = KWARGS, seed: int = 0):
    """(PEFT's, ours) holding the same perturbed adapter, in eval mode."""
    theirs, ours = peft_and_ours(tiny_llama, peft.PolyConfig(**kwargs), PolyConfig(**kwargs), seed)
    return theirs.eval(), ours.eval()


def _logits(model, ids: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits


def _peft_dir(tmp_path, kwargs: dict = KWARGS, seed: int = 1):
    """A PEFT Poly model with perturbed weights, saved; (model, directory)."""
    model = peft.get_peft_model(tiny_llama(), peft.PolyConfig(**kwargs)).eval()
    perturb_trainable(model, seed)
    model.save_pretrained(tmp_path / "poly")
    return model, tmp_path / "poly"


def _layer_arrays(layer: PolyLayer, adapter: str = "default") -> dict[str, np.ndarray]:
    """One layer's adapter tensors, keyed by their PEFT suffix."""
    return {"poly_lora_A": layer.poly_lora_A[adapter].detach().numpy(),
            "poly_lora_B": layer.poly_lora_B[adapter].detach().numpy(),
            "poly_router.module_logits": layer.poly_router[adapter].module_logits.detach().numpy()}


# -- PyTorch: forward, generate, checkpoints ---------------------------------------------------
def test_forward_with_task_ids_equals_peft_and_tasks_differ():
    theirs, ours = _pair()
    ids = token_ids(batch=3)

    assert max_diff(_logits(ours, ids, TASKS), _logits(theirs, ids, TASKS)) <= TOL
    assert max_diff(_logits(ours, ids, TASKS), _logits(ours, ids, torch.tensor([0, 0, 0]))) > 1e-3
    assert max_diff(_logits(ours, ids, TASKS), _logits(tiny_llama(), ids, None)) > 1e-2


def test_greedy_generate_with_task_ids_gives_peft_tokens():
    theirs, ours = _pair()
    ids = token_ids(batch=3, seq=5)
    args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                pad_token_id=0, task_ids=TASKS)

    ours_tokens = ours.generate(**args)

    assert torch.equal(ours_tokens, theirs.generate(**args))
    assert not torch.equal(ours_tokens, ours.generate(**{**args, "task_ids": torch.tensor([0, 0, 0])}))
    assert not torch.equal(ours_tokens, tiny_llama().generate(**{k: v for k, v in args.items() if k != "task_ids"}))


def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    theirs, directory = _peft_dir(tmp_path)

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), directory)

    ids = token_ids(batch=3)
    assert max_diff(_logits(ours, ids, TASKS), _logits(theirs, ids, TASKS)) <= TOL


def test_adapter_saved_here_loads_in_peft_with_same_keys_and_logits(tmp_path):
    _, ours = _pair(seed=2)
    ours.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(tiny_llama(), peft.PolyConfig(**KWARGS)).save_pretrained(tmp_path / "peft")

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()

    ids = token_ids(batch=3)
    assert max_diff(_logits(theirs, ids, TASKS), _logits(ours, ids, TASKS)) <= TOL
    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    q = "base_model.model.model.layers.0.self_attn.v_proj."
    assert keys[q + "poly_lora_A"] == (2, 2, 16, 4) and keys[q + "poly_lora_B"] == (2, 2, 4, 8)
    assert keys[q + "poly_router.module_logits"] == (3, 4)


def test_fresh_adapter_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), PolyConfig(**KWARGS)).eval()

    ids = token_ids()
    assert max_diff(_logits(model, ids, torch.tensor([0, 2])), _logits(tiny_llama(), ids, None)) == 0.0


# -- training --------------------------------------------------------------------------------
def test_training_forward_samples_the_router_as_peft_does():
    theirs, ours = _pair()
    theirs.train()
    ours.train()
    ids = token_ids(batch=3)

    torch.manual_seed(5)
    expected = theirs(input_ids=ids, task_ids=TASKS).logits
    torch.manual_seed(5)
    sampled = ours(input_ids=ids, task_ids=TASKS).logits

    assert max_diff(sampled, expected) <= TOL
    assert max_diff(sampled, _logits(ours.eval(), ids, TASKS)) > 1e-4  # relaxed Bernoulli, not sigmoid


def test_training_lowers_the_loss_and_changes_only_poly_tensors():
    torch.manual_seed(0)
    model = onnx_peft.get_peft_model(tiny_llama(), PolyConfig(**KWARGS)).train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids, tasks = token_ids(batch=4, seq=8), torch.tensor([0, 1, 2, 1])

    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids, task_ids=tasks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    changed = changed_since(model, before)
    adapter = {k for k in before if ".poly_" in k}
    assert losses[-1] < losses[0] - 1e-2
    assert changed == adapter and any(".poly_router." in k for k in changed)


# -- merging: one task only ------------------------------------------------------------------
def test_one_task_adapter_merges_and_matches_peft_unmerged():
    theirs, ours = _pair(ONE_TASK)
    ids, zero = token_ids(), torch.tensor([0, 0])
    expected = _logits(theirs, ids, zero)
    layers = {p: m for p, m in ours.base_model.model.named_modules() if isinstance(m, PolyLayer)}
    before = {p: layer.weight.detach().numpy().copy() for p, layer in layers.items()}

    ours.merge_adapter()
    merged = _logits(ours, ids, None)  # merged: no task ids needed
    for path, layer in layers.items():
        parts = _layer_arrays(layer)
        weight, bias = METHOD.merged_weight(ours.peft_config["default"], path, before[path], None, parts, {})
        assert isinstance(weight, np.ndarray) and bias is None
        assert np.abs(weight - layer.weight.detach().numpy()).max() <= 1e-6
    ours.unmerge_adapter()
    restored = _logits(ours, ids, zero)
    plain = ours.merge_and_unload()

    assert max_diff(merged, expected) <= TOL
    assert max_diff(restored, expected) <= TOL
    assert max_diff(_logits(plain, ids, None), expected) <= TOL
    assert not any(isinstance(m, PolyLayer) for m in plain.modules())


def test_many_task_adapter_refuses_to_merge_naming_the_way_out():
    _, ours = _pair()

    with pytest.raises(OnnxPeftError, match=r"n_tasks=3.*cannot be merged.*variant"):
        ours.merge_adapter()


# -- errors ----------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*Poly.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), PolyConfig(target_modules=["embed_tokens"]))


def test_n_splits_that_does_not_divide_the_features_is_refused():
    with pytest.raises(AdapterConfigError, match=r"q_proj has 32 input features.*n_splits=3"):
        onnx_peft.get_peft_model(tiny_llama(), PolyConfig(target_modules=["q_proj"], n_splits=3))


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(n_tasks=0), "n_tasks"), (dict(n_skills=1.5), "n_skills"),
    (dict(n_splits=-1), "n_splits"), (dict(poly_type="mhr"), "poly_type"), (dict(init_weights="yes"), "init_weights"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"PolyConfig.{field}"):
        PolyConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("task_ids, message", [
    (None, "needs task ids"), (torch.tensor([0, 3]), r"in \[0, 3\)"), (torch.tensor([0, 1, 2]), "3 entries"),
])
def test_bad_task_ids_raise_clearly(task_ids, message):
    _, ours = _pair()

    with pytest.raises(OnnxPeftError, match=message):
        _logits(ours, token_ids(), task_ids)


# -- the per-task LoRA (numpy) ---------------------------------------------------------------
@pytest.mark.parametrize("module", ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_per_task_lora_slots_reproduce_the_peft_layer_rows_of_that_task(module, tmp_path):
    theirs, directory = _peft_dir(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(directory)
    grouped = METHOD.group(load_adapter_weights(directory))
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().numpy()
    x = torch.randn(3, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x, task_ids=TASKS).numpy()

    for row, task in enumerate(TASKS.tolist()):
        one, tensors = METHOD.select_variant(config, grouped, f"task{task}")
        slots = METHOD.slot_tensors(one, module, tensors.modules[module], tensors.shared, lambda: weight)

        a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
        xn = x[row].numpy()
        assert list(slots) == ["lora"] and a.shape == (weight.shape[1], 4) and b.shape == (4, weight.shape[0])
        assert np.abs(xn @ weight.T + (xn @ a) @ b - expected[row]).max() <= TOL
        direct = task_lora(config, grouped.modules[module], task)
        assert all(np.abs(s - d).max() <= 1e-7 for s, d in zip((a, b), direct))


def test_a_selected_task_is_a_one_task_peft_adapter(tmp_path):
    theirs, directory = _peft_dir(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(directory)
    one, tensors = METHOD.select_variant(config, METHOD.group(load_adapter_weights(directory)), "task2")
    flat = {f"base_model.model.{m}.{k}": torch.from_numpy(v.copy())
            for m, parts in tensors.modules.items() for k, v in parts.items()}
    save_adapter_dir(tmp_path / "task2", one, flat)

    single = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "task2").eval()

    ids = token_ids()
    assert max_diff(_logits(single, ids, torch.tensor([0, 0])), _logits(theirs, ids, torch.tensor([2, 2]))) <= TOL


def test_variants_and_their_refusals():
    config = PolyConfig(**KWARGS)
    grouped = METHOD.group({k: v.detach().numpy() for k, v in _pair()[1].adapter_state_dict("default").items()})
    module = "model.layers.0.self_attn.q_proj"

    assert METHOD.variants(config) == ("task0", "task1", "task2")
    assert method_for("LORA").variants(onnx_peft.LoraConfig(target_modules=["q_proj"])) == ()
    with pytest.raises(IncompatibleAdapterError, match=r"n_tasks=3.*variant.*task0, task1, task2"):
        METHOD.slot_tensors(config, module, grouped.modules[module], {}, lambda: None)
    with pytest.raises(IncompatibleAdapterError, match=r"no variant 'task3'.*task0, task1, task2"):
        METHOD.select_variant(config, grouped, "task3")
    with pytest.raises(IncompatibleAdapterError, match="LORA adapter is one adapter"):
        method_for("LORA").select_variant(onnx_peft.LoraConfig(target_modules=["q_proj"]), grouped, "task0")


# -- ONNX: per-task slots in a session, one task per row ---------------------------------------
@pytest.fixture(scope="module")
def onnx_case(tmp_path_factory):
    """A base ONNX model, a PEFT Poly adapter and a LoRA slot model on the same targets."""
    from onnx_peft import export
    from onnx_peft.passes.insert_adapters import insert_adapters

    folder = tmp_path_factory.mktemp("poly_onnx")
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    poly, poly_dir = _peft_dir(folder)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=KWARGS["target_modules"]))
    lora.save_pretrained(folder / "lora")
    export(folder / "base", folder / "base_onnx", task="causal-lm", quiet=True)
    model = insert_adapters(folder / "base_onnx" / "model.onnx", {"lora": folder / "lora"}, folder / "slots")
    return dict(folder=folder, poly=poly, poly_dir=poly_dir, model=model,
                ids=np.random.default_rng(7).integers(1, 60, size=(3, 6)).astype(np.int64))


def _run(session, ids: np.ndarray, adapter) -> np.ndarray:
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}, adapter=adapter)[0]


def _expected(case, tasks: list[int]) -> np.ndarray:
    return _logits(case["poly"], torch.from_numpy(case["ids"]), torch.tensor(tasks)).numpy()


def test_converted_task_on_a_lora_slot_model_equals_peft_with_that_task(onnx_case):
    from onnx_peft.convert import convert_adapters
    from onnx_peft.runtime import AdapterSession

    session = AdapterSession(onnx_case["model"])
    for task in range(3):
        converted = convert_adapters(onnx_case["poly_dir"], onnx_case["model"], variant=f"task{task}",
                                     output_path=onnx_case["folder"] / f"poly.task{task}.onnx_adapter")
        session.load_adapter(f"poly.task{task}", converted)

    for task in range(3):
        got = _run(session, onnx_case["ids"], f"poly.task{task}")
        assert np.abs(got - _expected(onnx_case, [task] * 3)).max() <= TOL
    assert np.abs(_run(session, onnx_case["ids"], "poly.task0") - _run(session, onnx_case["ids"], "poly.task1")).max() > 1e-3


def test_session_refuses_a_many_task_adapter_without_a_variant(onnx_case):
    from onnx_peft.runtime import AdapterSession

    session = AdapterSession(onnx_case["model"])
    with pytest.raises(IncompatibleAdapterError, match=r"n_tasks=3.*variant"):
        session.load_adapter("poly", onnx_case["poly_dir"])


def test_multi_adapter_rows_of_different_tasks_equal_peft_with_mixed_task_ids(onnx_case):
    from onnx_peft.convert import peft_to_slots
    from onnx_peft.formats import read_peft_adapter
    from onnx_peft.passes.multi_adapter import multi_adapter
    from onnx_peft.runtime import AdapterSession

    session = AdapterSession(multi_adapter(onnx_case["model"], onnx_case["folder"] / "multi"))
    config, tensors = read_peft_adapter(onnx_case["poly_dir"])
    for task in range(3):
        session.load_adapter(f"poly.task{task}", peft_to_slots(config, tensors, variant=f"task{task}",
                                                               contract=session.contract))

    got = _run(session, onnx_case["ids"], ["poly.task2", "poly.task0", "poly.task1"])

    assert np.abs(got - _expected(onnx_case, [2, 0, 1])).max() <= TOL


def test_merge_pass_of_a_one_task_adapter_equals_peft(onnx_case, tmp_path):
    from onnx_peft.passes.merge_adapters import merge_adapters
    from onnx_peft.runtime import AdapterSession

    poly, directory = _peft_dir(tmp_path, ONE_TASK, seed=3)

    merged = merge_adapters(onnx_case["folder"] / "base_onnx" / "model.onnx", tmp_path / "merged" / "model.onnx",
                            directory)

    ids = onnx_case["ids"]
    expected = _logits(poly, torch.from_numpy(ids), torch.zeros(3, dtype=torch.long)).numpy()
    assert np.abs(_run(AdapterSession(merged), ids, None) - expected).max() <= TOL
