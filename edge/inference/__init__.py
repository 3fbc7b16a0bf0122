"""Inference: the policy bundle, the backends (ONNX Runtime, TensorRT), the CUDA layer, the engine
key, the tokenizer, frame preparation and the policy pipeline (encoders once, head T times in one batch).

Never imports `edge.io`, `edge.control` or `edge.service`; TensorRT and cuda-python only lazily.
"""
