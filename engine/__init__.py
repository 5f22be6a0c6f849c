"""edlight engine: torch-free Pix2Struct captioning with ONNX Runtime.

Nothing in this package imports torch, transformers or optimum.
"""

__version__ = "0.1.0"
