"""Analytic memory model for tools/estimate_memory.py (and its checks): activations.py counts a PI0's
parameters and activation bytes from the model definition, zero.py adds what a DeepSpeed ZeRO engine keeps
per rank. Pure arithmetic, no engine: nothing in training imports this room."""
