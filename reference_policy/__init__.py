"""Reference VLA policy: pretrained EfficientNet-Lite0 + all-MiniLM-L6-v2, FiLM fusion, MC-dropout head.

Owns torch; used by training, evaluation and the offline build, never by the runtime.
"""
