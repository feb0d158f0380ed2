"""What the arm64 lane's requests give on this x86 host: the daemon's greedy answer and the embeddings.

- greedy: the chat prompt through the bundle's template and the daemon's own GgufModel (tokenize,
  sampler settings at temperature 0), so its text is what `edgekit serve` answers on any core whose
  greedy tokens equal x86's; with each token's text and whether that text is the token's alone;
- int8: the ONNX bundle's embeddings with onnxruntime here;
- fp32: the PyTorch model the bundle was gated against at export, and those gates (min_cosine_each,
  min_cosine_mean). Block-int8 kernels differ by instruction set (onnxruntime computes MatMulNBits
  with int8 dot products only where a core has them), so an Arm core's embeddings are judged the way
  export judged x86's: against the original model.

Workstation side (torch for the fp32 model). Prints one JSON object.

    python x86_reference.py --chat-bundle B --prompt T --max-tokens N --embed-bundle E --text T [--text T ...]
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
    # GgufModel.generate's sampler at temperature 0: greedy.
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
    # A streamed answer carries one token's text per chunk; a text that no other token of the vocabulary
    # has names its token id, so the board's chunks give the board's ids.
    counts: dict[bytes, int] = {}
    for token in range(model.llm.n_vocab()):
        counts[model.piece(token)] = counts.get(model.piece(token), 0) + 1
    pieces = []
    for token in ids:
        piece = model.piece(token)
        try:
            pieces.append({"id": token, "text": piece.decode("utf-8"), "unique": counts[piece] == 1})
        except UnicodeDecodeError:  # part of a character: streamed together with the next token
            pieces.append({"id": token, "text": None, "unique": False})
    return {"bundle": manifest.name, "prompt_ids": prompt_ids, "ids": ids, "text": text, "pieces": pieces}


def embeddings(bundle: Path, texts: list[str]) -> dict:
    from edgekit.export.reference import load_reference, reference_outputs
    from edgekit.export.sources import store_dir
    from edgekit.runtime.encoder import EncoderModel, pool
    from edgekit.runtime.verify import model_file, verify_for_runtime

    manifest = verify_for_runtime(bundle)
    candidate = EncoderModel(bundle, manifest.runtime, model_path=model_file(bundle, manifest))
    reference = load_reference(store_dir(manifest.source_id), manifest.task)
    (hidden,) = reference_outputs(reference, candidate, texts)  # fed exactly the bundle's token ids
    _, mask = candidate.feeds(texts)
    fp32 = pool(hidden, mask, manifest.runtime.pooling, manifest.runtime.normalize)
    gates = {g.gate: g.threshold for g in manifest.gates if g.gate in ("min_cosine_each", "min_cosine_mean")}
    return {"bundle": manifest.name, "source": manifest.source_id, "gates": gates,
            "int8": candidate.embed(texts).astype(float).tolist(), "fp32": fp32.astype(float).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat-bundle", type=Path, required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--embed-bundle", type=Path, required=True)
    parser.add_argument("--text", action="append", required=True)
    args = parser.parse_args()
    print(json.dumps({"greedy": greedy(args.chat_bundle, args.prompt, args.max_tokens),
                      "embeddings": embeddings(args.embed_bundle, args.text)}))


if __name__ == "__main__":
    main()
