"""Execution providers (onnx_peft/runtime/providers.py) and AdapterSession's device arguments.

Real sessions on the tiny slot model of test_runtime check what this machine's onnxruntime does;
a fake ``ort`` with CUDA checks the CUDA plan (TF32 off by default, options merged) anywhere, and
a fake session checks that options a provider silently dropped or changed are refused.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
from test_runtime import DIMS, build_slot_model, make_adapter, reference

from onnx_peft.errors import RuntimeSessionError
from onnx_peft.runtime import AdapterSession
from onnx_peft.runtime.providers import (
    CPU,
    CUDA,
    ProviderPlan,
    check_applied,
    parse_option_flags,
    plan_providers,
    rejected_option,
)

HAS_CUDA = CUDA in onnxruntime.get_available_providers()


def fake_ort(*providers: str) -> SimpleNamespace:
    """Stands in for the onnxruntime module: plan_providers only asks what it has."""
    return SimpleNamespace(get_available_providers=lambda: list(providers))


GPU_ORT = fake_ort(CUDA, CPU)
CPU_ORT = fake_ort("AzureExecutionProvider", CPU)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_slot_model(tmp_path_factory.mktemp("providers") / "tiny.onnx")


# -- AdapterSession on this machine's onnxruntime -----------------------------------------------
def test_device_cpu_runs_on_the_cpu_provider(model_path):
    session = AdapterSession(model_path, device="cpu")
    assert session.provider == CPU and session.device == "cpu"
    adapter = make_adapter(4, 1)
    session.load_adapter("a", adapter)
    x = np.random.default_rng(0).standard_normal((2, 3, DIMS[0])).astype(np.float32)
    assert np.abs(session.run(None, {"x": x}, adapter="a")[0] - reference(x, adapter)).max() <= 1e-5


def test_auto_picks_cuda_exactly_when_onnxruntime_has_it(model_path):
    for device in (None, "auto"):
        session = AdapterSession(model_path, device=device)
        assert session.device == ("cuda" if HAS_CUDA else "cpu")
        assert session.provider == (CUDA if HAS_CUDA else CPU)


def test_providers_list_overrides_device(model_path):
    session = AdapterSession(model_path, providers=["CPUExecutionProvider"], device="cuda")
    assert session.provider == CPU and session.device == "cpu"
    assert AdapterSession(model_path, providers=[("cpu", {})]).provider == CPU  # short names, pairs


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: device='cuda' starts it")
def test_device_cuda_without_onnxruntime_gpu_says_what_to_install(model_path):
    with pytest.raises(RuntimeSessionError, match=r"CUDAExecutionProvider.*install onnxruntime-gpu"):
        AdapterSession(model_path, device="cuda")


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:0", ""])
def test_unknown_device_names_the_choices(model_path, device):
    with pytest.raises(RuntimeSessionError, match=rf"device must be one of auto, cpu, cuda; got '{device}'"):
        AdapterSession(model_path, device=device)


def test_an_option_the_cpu_provider_does_not_take_is_named(model_path):
    with pytest.raises(RuntimeSessionError, match=r"CPUExecutionProvider rejected provider option 'foo'"):
        AdapterSession(model_path, device="cpu", provider_options={"cpu": {"foo": "1"}})
    with pytest.raises(RuntimeSessionError, match="'foo'"):
        AdapterSession(model_path, providers=[(CPU, {"foo": 1})])


def test_options_for_a_provider_the_session_does_not_use_are_refused(model_path):
    with pytest.raises(RuntimeSessionError, match=r"provider option\(s\) device_id are for CUDAExecutionProvider, which this "
                                                  r"session does not use \(it uses CPUExecutionProvider\)"):
        AdapterSession(model_path, device="cpu", provider_options={"cuda": {"device_id": "0"}})


def test_a_provider_onnxruntime_lacks_is_named_with_those_it_has(model_path):
    with pytest.raises(RuntimeSessionError, match=r"NoSuchExecutionProvider is not in this onnxruntime "
                                                  r"\(it has .*CPUExecutionProvider.*\); pick one of those"):
        AdapterSession(model_path, providers=["NoSuchExecutionProvider"])


# -- plan_providers with CUDA (a fake onnxruntime-gpu) ------------------------------------------
def test_cuda_runs_fp32_without_tf32_unless_asked():
    plan = plan_providers(GPU_ORT, device="cuda")
    assert plan.names == [CUDA, CPU] and plan.options == [{"use_tf32": "0"}, {}]
    assert plan.device == "cuda" and plan.explicit
    assert plan_providers(GPU_ORT, device="cuda", tf32=True).options[0] == {"use_tf32": "1"}
    explicit = plan_providers(GPU_ORT, device="cuda", tf32=True, provider_options={"cuda": {"use_tf32": "0"}})
    assert explicit.options[0] == {"use_tf32": "0"}  # the option itself wins over tf32=True


def test_auto_prefers_cuda_and_may_fall_back():
    auto = plan_providers(GPU_ORT)
    assert auto.names == [CUDA, CPU] and auto.options[0] == {"use_tf32": "0"} and not auto.explicit
    assert plan_providers(GPU_ORT, device="auto").names == [CUDA, CPU]
    cpu = plan_providers(GPU_ORT, device="cpu")
    assert cpu.names == [CPU] and cpu.options == [{}] and cpu.device == "cpu" and cpu.explicit
    assert plan_providers(CPU_ORT).names == [CPU]
    with pytest.raises(RuntimeSessionError, match="no CUDAExecutionProvider.*install onnxruntime-gpu"):
        plan_providers(CPU_ORT, device="cuda")


def test_user_options_merge_over_the_defaults_as_strings():
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"device_id": 1, "gpu_mem_limit": 2 ** 31}})
    assert plan.options[0] == {"device_id": "1", "gpu_mem_limit": "2147483648", "use_tf32": "0"}
    flags = plan_providers(GPU_ORT, device="cuda", provider_options={CUDA: {"do_copy_in_default_stream": True,
                                                                            "cudnn_conv_use_max_workspace": False}})
    assert flags.options[0] == {"do_copy_in_default_stream": "1", "cudnn_conv_use_max_workspace": "0", "use_tf32": "0"}
    assert plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"use_tf32": True}}).options[0] == {
        "use_tf32": "1"}
    both = plan_providers(GPU_ORT, provider_options={"cuda": {"device_id": "1"}, CUDA: {"gpu_mem_limit": "8"}})
    assert both.options[0] == {"device_id": "1", "gpu_mem_limit": "8", "use_tf32": "0"}  # one provider, two spellings


def test_providers_list_form_takes_pairs_and_short_names():
    plan = plan_providers(GPU_ORT, providers=[("cuda", {"device_id": 1}), "cpu"], device="cpu")
    assert plan.names == [CUDA, CPU] and plan.explicit
    assert plan.options == [{"device_id": "1", "use_tf32": "0"}, {}]
    merged = plan_providers(GPU_ORT, providers=[(CUDA, {"device_id": "1"})], provider_options={"cuda": {"device_id": "2"}})
    assert merged.options == [{"device_id": "2", "use_tf32": "0"}]


@pytest.mark.parametrize("providers", ["CPUExecutionProvider", [], [(1, {})], [(CPU, {}, {})], [(CPU, "x=1")], [3]])
def test_malformed_providers_are_refused(providers):
    with pytest.raises(RuntimeSessionError, match="provider"):
        plan_providers(GPU_ORT, providers=providers)


@pytest.mark.parametrize("options, match", [
    ("device_id=1", "must map a provider name to its options"),
    ({"cuda": "device_id=1"}, r"provider_options\['cuda'\] must be a dict"),
    ({"tensorrt": {"trt_fp16_enable": "1"}}, "trt_fp16_enable are for TensorrtExecutionProvider, which this session does not use"),
])
def test_malformed_provider_options_are_refused(options, match):
    with pytest.raises(RuntimeSessionError, match=match):
        plan_providers(GPU_ORT, provider_options=options)


# -- the CLI's --provider-option -----------------------------------------------------------------
def test_option_flags_default_to_cuda_and_take_a_provider_prefix():
    assert parse_option_flags(["device_id=1", "cuda:gpu_mem_limit=2", "cpu:x=1"]) == {
        CUDA: {"device_id": "1", "gpu_mem_limit": "2"}, CPU: {"x": "1"}}
    assert parse_option_flags([]) == {}
    assert parse_option_flags(["CUDAExecutionProvider:device_id=0", "device_id=3"]) == {CUDA: {"device_id": "3"}}
    # a value may hold ':' and '=' (paths, lists); only the key side names the provider
    assert parse_option_flags(["tensorrt:trt_engine_cache_path=/cache:v2", "x=a=b"]) == {
        "TensorrtExecutionProvider": {"trt_engine_cache_path": "/cache:v2"}, CUDA: {"x": "a=b"}}


@pytest.mark.parametrize("text", ["noequals", "=1", "cuda:=1", ":device_id=1", "cuda:noequals"])
def test_malformed_option_flags_name_the_flag(text):
    with pytest.raises(RuntimeSessionError, match=rf"--provider-option '{text}': expected KEY=VALUE or "
                                                  r"PROVIDER:KEY=VALUE"):
        parse_option_flags([text])


# -- options the created session did not take ---------------------------------------------------
def fake_session(applied: dict[str, dict[str, str]]) -> SimpleNamespace:
    """What InferenceSession.get_provider_options() reports: each started provider's options."""
    return SimpleNamespace(get_provider_options=lambda: applied)


CUDA_APPLIED = {CUDA: {"device_id": "0", "use_tf32": "0", "gpu_mem_limit": "18446744073709551615"}, CPU: {}}


def test_check_applied_names_a_dropped_or_changed_option():
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"device_id": "0", "typo_limit": "1"}})
    with pytest.raises(RuntimeSessionError, match=r"CUDAExecutionProvider rejected provider option 'typo_limit': "
                                                  r"it is not one it takes \(it takes: device_id, gpu_mem_limit, use_tf32\)"):
        check_applied(fake_session(CUDA_APPLIED), plan)
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"device_id": "1"}})
    with pytest.raises(RuntimeSessionError, match=r"rejected provider option device_id='1': it kept '0'"):
        check_applied(fake_session(CUDA_APPLIED), plan)
    with pytest.raises(RuntimeSessionError, match=r"use_tf32='0': it kept '1'"):
        check_applied(fake_session({CUDA: {"use_tf32": "1"}, CPU: {}}), plan_providers(GPU_ORT, device="cuda"))


def test_check_applied_accepts_what_the_provider_kept():
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"device_id": 0}})
    assert check_applied(fake_session(CUDA_APPLIED), plan) is None
    # ORT parses "true"/"False" and "01" and writes them back as "1"/"0" and "1": the same values
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"use_tf32": "False", "device_id": "01"}})
    assert check_applied(fake_session({CUDA: {"use_tf32": "0", "device_id": "1"}, CPU: {}}), plan) is None
    # a provider that did not start (the CPU fallback is checked by the session) has nothing to check
    assert check_applied(fake_session({CPU: {}}), plan) is None


def test_check_applied_on_a_real_cpu_session_refuses_every_option(model_path):
    plan = ProviderPlan([CPU], [{"intra_op_num_threads": "2"}], explicit=True)
    session = onnxruntime.InferenceSession(str(model_path), providers=[CPU])
    with pytest.raises(RuntimeSessionError, match=r"'intra_op_num_threads': it is not one it takes \(it takes: none\)"):
        check_applied(session, plan)


def test_rejected_option_names_the_option_an_error_mentions():
    plan = plan_providers(GPU_ORT, device="cuda", provider_options={"cuda": {"gpu_mem_limit": "x", "x": "1"}})
    error = RuntimeError("[ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h\nFailed to parse 'gpu_mem_limit'")
    assert rejected_option(error, plan) == ("CUDAExecutionProvider rejected provider option gpu_mem_limit='x': "
                                            "Failed to parse 'gpu_mem_limit'")
    # an option named "x" is not mentioned by an error about input "x.onnx" or "index"
    assert rejected_option(RuntimeError("cannot read x.onnx at index 3"), plan) is None
    assert rejected_option(RuntimeError("Load model failed"), plan) is None
