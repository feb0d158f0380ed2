"""Greedy token ids of a GGUF bundle and embeddings of an ONNX bundle, printed as JSON.

Board-side code only (edgekit.runtime): the same file runs inside the arm64 root on each emulated
core and on the x86 host, so the two outputs compare like for like. The chat prompt goes through
the bundle's template and the daemon's tokenization (GgufModel), so the text equals what
`edgekit serve` answers to the same greedy request.

    python board_probe.py greedy BUNDLE --prompt TEXT --max-tokens N
    python board_probe.py embed BUNDLE TEXT...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def greedy(bundle: Path, prompt: str, max_tokens: int) -> dict:
    from edgekit.runtime.llm import DEFAULT_MIN_P, DEFAULT_TOP_K, GgufModel
    from edgekit.runtime.verify import model_file, verify_for_runtime

    manifest = verify_for_runtime(bundle)
    model = GgufModel(model_file(bundle, manifest), n_ctx=512, chat_template=manifest.runtime.chat_template)
    prompt_ids = model.tokenize(model.render_chat([{"role": "user", "content": prompt}]), chat=True)
    ids: list[int] = []
    # The daemon's sampler settings at temperature 0 (GgufModel.generate): greedy.
    tokens = model.llm.generate(prompt_ids, top_k=DEFAULT_TOP_K, top_p=1.0, min_p=DEFAULT_MIN_P, temp=0.0,
                                repeat_penalty=1.0, reset=True)
    try:
        for token in tokens:
            if model._llama_cpp.llama_vocab_is_eog(model._vocab, token) or len(ids) >= max_tokens:
                break
            ids.append(int(token))
    finally:
        tokens.close()
    text = b"".join(model.piece(t) for t in ids).decode("utf-8", errors="replace")
    return {"bundle": bundle.name, "prompt_ids": prompt_ids, "ids": ids, "text": text}


def embed(bundle: Path, texts: list[str]) -> dict:
    from edgekit.runtime.encoder import EncoderModel
    from edgekit.runtime.verify import model_file, verify_for_runtime

    manifest = verify_for_runtime(bundle)
    model = EncoderModel(bundle, manifest.runtime, model_path=model_file(bundle, manifest))
    return {"bundle": bundle.name, "embeddings": model.embed(texts).astype(float).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("greedy")
    g.add_argument("bundle", type=Path)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, required=True)
    e = sub.add_parser("embed")
    e.add_argument("bundle", type=Path)
    e.add_argument("texts", nargs="+")
    args = parser.parse_args()
    if args.command == "greedy":
        result = greedy(args.bundle, args.prompt, args.max_tokens)
    else:
        result = embed(args.bundle, args.texts)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
