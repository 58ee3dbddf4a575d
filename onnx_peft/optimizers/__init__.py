"""Optimizers made for LoRA training: LoRA+ (larger step for B) and LoRA-FA (frozen A,
projected B gradient). Importing this needs torch."""

from .lorafa import LoraFAOptimizer, create_lorafa_optimizer
from .loraplus import create_loraplus_optimizer

__all__ = ["LoraFAOptimizer", "create_lorafa_optimizer", "create_loraplus_optimizer"]
