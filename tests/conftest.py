"""Suite-wide settings: quiet progress bars, offline hub, deterministic torch when present."""

import os

os.environ.setdefault("ONNX_PEFT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
