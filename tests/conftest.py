"""Suite-wide settings: quiet progress bars, offline hub, deterministic torch when present."""

import os

os.environ.setdefault("ONNX_PEFT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # two xdist workers on two cores: one intra-op thread each avoids oversubscription
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch-free checks run in their own subprocesses
    pass
