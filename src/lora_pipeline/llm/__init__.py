"""Causal-LM LoRAs: training with response-only loss, evaluation helpers, JSON-constrained decoding."""
