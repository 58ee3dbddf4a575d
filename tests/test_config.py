"""LoraConfig: PEFT's field names and defaults, adapter_config.json round trip, typed errors,
module targeting rules, and the torch-free LoRA/DoRA math shared with the ONNX passes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from onnx_peft import AdapterConfig, LoraConfig
from onnx_peft.errors import AdapterConfigError
from onnx_peft.methods.lora import (
    dora_factor,
    dora_weight,
    lora_delta_weight,
    lora_embedding_delta_weight,
)
from onnx_peft.targets import is_target, layer_index, pattern_value

PEFT_WRITTEN = {  # an adapter_config.json as PEFT 0.21 writes it, trimmed of nothing
    "alora_invocation_tokens": None, "alpha_pattern": {"v_proj": 4}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": "org/tiny", "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False,
    "lora_dropout": 0.05, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8,
    "rank_pattern": {"q_proj": 4}, "revision": None, "target_modules": ["v_proj", "q_proj"],
    "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
    "use_dora": False, "use_qalora": False, "use_rslora": True,
}


# -- JSON round trip ----------------------------------------------------------------------------
def test_peft_written_config_loads_with_every_field():
    config = AdapterConfig.from_dict(PEFT_WRITTEN)

    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (8, 16, 0.05, True)
    assert config.rank_pattern == {"q_proj": 4} and config.alpha_pattern == {"v_proj": 4}
    assert config.task_type == "CAUSAL_LM" and config.base_model_name_or_path == "org/tiny"
    assert config.extra["peft_version"] == "0.21.2"


def test_round_trip_keeps_fields_we_do_not_model(tmp_path):
    AdapterConfig.from_dict(PEFT_WRITTEN).save(tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())

    assert written == PEFT_WRITTEN


def test_loraconfig_from_pretrained_reads_a_directory(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(PEFT_WRITTEN))

    assert LoraConfig.from_pretrained(tmp_path).r == 8


def test_written_config_loads_in_peft_with_the_same_values(tmp_path):
    peft = pytest.importorskip("peft")
    LoraConfig(r=6, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True, bias="lora_only",
               layers_to_transform=[0], init_lora_weights="gaussian", use_dora=True).save(tmp_path)

    loaded = peft.PeftConfig.from_pretrained(tmp_path)

    assert (loaded.r, loaded.lora_alpha, loaded.bias, loaded.fan_in_fan_out) == (6, 3, "lora_only", True)
    assert (loaded.layers_to_transform, loaded.init_lora_weights, loaded.use_dora) == ([0], "gaussian", True)


def test_set_of_target_modules_is_stored_as_a_sorted_list():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, exclude_modules={"b", "a"})

    assert config.to_dict()["target_modules"] == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["a", "b"]


# -- typed errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("data,message", [
    ({**PEFT_WRITTEN, "peft_type": "NOT_A_METHOD"}, "unknown peft_type 'NOT_A_METHOD'"),
    ({k: v for k, v in PEFT_WRITTEN.items() if k != "peft_type"}, "missing 'peft_type'"),
    ({**PEFT_WRITTEN, "lora_bias": True}, "lora_bias"),
    ({**PEFT_WRITTEN, "use_qalora": True}, "use_qalora"),
    ({**PEFT_WRITTEN, "layer_replication": [[0, 2]]}, "layer_replication"),
    ({**PEFT_WRITTEN, "r": 0}, "r must be a positive integer"),
    ({**PEFT_WRITTEN, "r": "8"}, "r must be a positive integer"),
    ({**PEFT_WRITTEN, "bias": "some"}, "bias must be"),
    ({**PEFT_WRITTEN, "lora_dropout": 1.5}, "lora_dropout"),
    ({**PEFT_WRITTEN, "init_lora_weights": "not_an_init"}, "init_lora_weights='not_an_init'"),
    ({**PEFT_WRITTEN, "layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({**PEFT_WRITTEN, "target_modules": ".*proj", "layers_to_transform": [0]}, "regex"),
])
def test_bad_config_is_a_typed_error_naming_the_field(data, message):
    with pytest.raises(AdapterConfigError, match=message):
        AdapterConfig.from_dict(data, source="adapter_config.json")


@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_unreadable_config_file_is_a_typed_error_naming_the_file(tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)

    with pytest.raises(AdapterConfigError, match=rf"adapter_config\.json.*{message}"):
        AdapterConfig.from_pretrained(tmp_path)


def test_missing_config_file_is_a_typed_error(tmp_path):
    with pytest.raises(AdapterConfigError, match="no adapter config found"):
        AdapterConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "pissa_niter_16", "olora"])
def test_supported_init_variants_are_accepted(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


# -- targeting (same rules as PEFT) -------------------------------------------------------------
@pytest.mark.parametrize("kwargs,key,expected", [
    (dict(target_modules=["q_proj"]), "model.layers.0.self_attn.q_proj", True),
    (dict(target_modules=["q_proj"]), "model.layers.0.self_attn.xq_proj", False),
    (dict(target_modules=["self_attn.q_proj"]), "model.layers.0.self_attn.q_proj", True),
    (dict(target_modules=r".*\.1\..*proj"), "model.layers.1.mlp.up_proj", True),
    (dict(target_modules=r".*\.1\..*proj"), "model.layers.0.mlp.up_proj", False),
    (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), "model.layers.0.self_attn.q_proj", False),
    (dict(target_modules=["q_proj"], exclude_modules=r".*0.*"), "model.layers.0.self_attn.q_proj", False),
    (dict(target_modules=["dense"], modules_to_save=["classifier"]), "classifier.dense", False),
    (dict(target_modules=["q_proj"], layers_to_transform=[1]), "model.layers.1.self_attn.q_proj", True),
    (dict(target_modules=["q_proj"], layers_to_transform=1), "model.layers.0.self_attn.q_proj", False),
    (dict(target_modules=["q_proj"], layers_to_transform=[], layers_pattern=None), "a.b.0.q_proj", True),
    (dict(target_modules=["q"], layers_to_transform=[2], layers_pattern="h"), "transformer.h.2.attn.q", True),
    (dict(target_modules=["q"], layers_to_transform=[2], layers_pattern=["blocks", "h"]), "t.h.2.q", True),
    (dict(target_modules=["q"], layers_to_transform=[2], layers_pattern="blocks"), "t.h.2.q", False),
    (dict(target_modules=None), "anything", False),
])
def test_is_target_follows_peft_rules(kwargs, key, expected):
    assert is_target(key, LoraConfig(**kwargs)) is expected


def test_layer_index_is_the_first_numbered_segment():
    assert layer_index("model.layers.3.mlp.up_proj", None) == 3
    assert layer_index("encoder.block.1.layer.0.SelfAttention.q", "layer") == 0
    assert layer_index("lm_head", None) is None


def test_rank_and_alpha_patterns_match_key_suffixes_first_entry_wins():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4},
                        alpha_pattern={"v_proj": 1})

    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 4
    assert config.rank_for("model.layers.1.self_attn.k_proj") == 8
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 1
    assert config.scaling_for("model.layers.1.self_attn.q_proj") == 16 / 4
    assert pattern_value({"proj": 3}, "model.xproj", 9) == 9  # whole path components only


def test_rslora_scaling_uses_sqrt_rank():
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("q") == 2.0


# -- the shared math, on numpy --------------------------------------------------------------------
def test_lora_delta_weight_numpy_layouts():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((2, 5)), rng.standard_normal((3, 2))

    delta = lora_delta_weight(A, B, 0.5)
    transposed = lora_delta_weight(A, B, 0.5, fan_in_fan_out=True)
    conv = lora_delta_weight(A.reshape(2, 5, 1, 1), B.reshape(3, 2, 1, 1), 0.5, base_shape=(3, 5, 1, 1))

    np.testing.assert_allclose(delta, 0.5 * B @ A, atol=1e-12)
    np.testing.assert_allclose(transposed, delta.T, atol=1e-12)
    np.testing.assert_allclose(conv.reshape(3, 5), delta, atol=1e-12)


def test_embedding_delta_weight_is_num_embeddings_by_dim():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((2, 7)), rng.standard_normal((4, 2))

    np.testing.assert_allclose(lora_embedding_delta_weight(A, B, 3.0), 3.0 * (B @ A).T, atol=1e-12)


def test_dora_weight_rows_have_the_magnitude_as_norm():
    rng = np.random.default_rng(2)
    W, dW, m = rng.standard_normal((3, 5)), rng.standard_normal((3, 5)), np.array([1.0, 2.0, 3.0])

    merged = dora_weight(W, dW, m)

    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), m, atol=1e-12)
    np.testing.assert_allclose(merged, dora_factor(W, dW, m)[:, None] * (W + dW), atol=1e-12)


# -- torch-free -----------------------------------------------------------------------------------
def test_config_checkpoint_targets_and_math_import_without_torch(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(PEFT_WRITTEN))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from onnx_peft import AdapterConfig, LoraConfig
        from onnx_peft.checkpoint import read_safetensors, write_safetensors
        from onnx_peft.methods.lora import lora_delta_weight
        from onnx_peft.targets import is_target
        config = AdapterConfig.from_pretrained({str(tmp_path)!r})
        write_safetensors({str(tmp_path / "w.safetensors")!r}, {{"x": np.ones(2, np.float32)}})
        assert read_safetensors({str(tmp_path / "w.safetensors")!r})[0]["x"].sum() == 2
        assert is_target("model.layers.0.self_attn.q_proj", config)
        print("ok", config.r)
    """)

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 8"
