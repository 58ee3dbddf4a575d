"""Data-driven LoRA initializations that need a pass over data (EVA). Importing this needs torch."""
