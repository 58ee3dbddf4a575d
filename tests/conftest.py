"""Suite-wide settings: quiet progress bars, offline hub, deterministic torch when present; and
the ONNX Runtime device lane every runtime test runs on (``ort_device``)."""

import os

import pytest

os.environ.setdefault("ONNX_PEFT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # two xdist workers on two cores: one intra-op thread each avoids oversubscription
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free checks run in their own subprocesses
    pass


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


NO_CUDA = "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the test runs on ONNX Runtime's CUDA provider (select with -m cuda)")


@pytest.fixture(scope="module", ids=["cpu", "cuda"], params=[
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _ort_has_cuda(), reason=NO_CUDA)])])
def ort_device(request) -> str:
    """The AdapterSession ``device`` a runtime test runs on: every test taking this fixture runs
    once per provider, CPU always, CUDA where onnxruntime-gpu has it (skipped elsewhere).
    Module-scoped so module fixtures (a served deployment) can be built per device; a wider
    scope would make pytest group the device lanes across modules and rebuild module fixtures."""
    return request.param


@pytest.fixture(scope="module")
def ort_providers(ort_device) -> list:
    """ORT's ``providers=`` list for ``ort_device``, for plain InferenceSession references beside
    an AdapterSession: CUDA without TF32, as AdapterSession runs it, so both compute the same."""
    if ort_device == "cuda":
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
