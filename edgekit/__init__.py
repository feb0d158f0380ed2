"""edgekit: take a small language model from a Hugging Face checkpoint to an offline service on a CPU board.

The package is split by where code runs:

- ``edgekit.schema``  — pydantic descriptions of recipes, bundles (manifests) and devices; imports nothing heavy.
- ``edgekit.export``  — workstation side: model store, ONNX/GGUF export, quality gates (torch, optimum, gguf).
- ``edgekit.runtime`` — board side: load a verified bundle and run it (onnxruntime, tokenizers, llama-cpp).
"""

__version__ = "0.1.0"
