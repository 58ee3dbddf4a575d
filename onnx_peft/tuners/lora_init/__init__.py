"""Data-driven LoRA initializations that need a pass over data (EVA, CorDA, LoRA-GA). Importing this needs torch."""
