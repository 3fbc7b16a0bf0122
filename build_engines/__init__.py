"""Offline build: PyTorch policy -> ONNX graphs -> calibrated INT8/FP16 graphs -> engines -> bundle.

Owns torch. Never imported by the runtime (`edge/`).
"""
