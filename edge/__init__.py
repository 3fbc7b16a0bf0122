"""On-device runtime for VLA policies on NVIDIA Jetson robots.

Imports numpy, onnxruntime, OpenCV, pyserial and tokenizers; TensorRT and cuda-python
only where installed. Never imports torch or build code.
"""

__version__ = "0.1.0"
