"""Using a trained tower: export it, load it (torch, NumPy or ONNX), encode and search with it.

Nothing here trains: it reads a run's checkpoints (`training.checkpoint`) or an exported
directory, and encodes and searches through the same backends and miners as training.
"""
