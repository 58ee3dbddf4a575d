"""Graph passes, one per file, each an ``onnx_ir`` pass: ``call(model) -> PassResult``."""

from .extract_adapters import ExtractAdapters, extract_adapters  # noqa: F401
from .insert_adapters import InsertAdapters, insert_adapters  # noqa: F401
from .merge_adapters import MergeAdapters, merge_adapters  # noqa: F401
from .multi_adapter import MultiAdapterPass, multi_adapter  # noqa: F401
