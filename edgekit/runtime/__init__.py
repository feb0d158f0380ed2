"""Board side: load verified bundles and run them. Imports onnxruntime, tokenizers, numpy, llama-cpp — never torch."""
