"""Real training inside worker processes: tokenizers, data, models and the split forward/backward."""
