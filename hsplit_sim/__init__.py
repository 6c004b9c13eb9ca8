"""hsplit-sim: heterogeneous split LoRA fine-tuning, simulated in time and trained for real."""

__version__ = "0.1.0"
