"""Benchmark constrained decoding on a GGUF bundle: decode speed with and without a grammar, and schema conversion.

    python scripts/bench_structured.py BUNDLE_DIR [--runs 3] [--tokens 64] [--threads N]

Decode: greedy generation of the same chat prompt, free text vs a JSON-schema grammar vs json_object, tokens/s
of the generated tokens (median of ``--runs``; prefill excluded by a warm KV cache of the prompt). Conversion:
the time ``schema_grammar`` takes on the largest schemas the daemon accepts, and on one it refuses (20,000
keywords), in the daemon's process (it runs before a request is queued). Prints a table, writes
bench-results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgekit.runtime.llm import Delta, Finish, GgufModel, Sampling  # noqa: E402
from edgekit.runtime.structured import (  # noqa: E402
    JSON_OBJECT_GRAMMAR_SCHEMA,
    MAX_OPTIONAL_PROPERTIES,
    UnsupportedSchema,
    schema_grammar,
)

PROMPT = [{"role": "user", "content": "Describe three European capitals as JSON: name, country, population."}]
SCHEMA = {"type": "object", "properties": {"capitals": {"type": "array", "maxItems": 3, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                                     "population": {"type": "integer"}}, "required": ["name", "country", "population"]}}},
    "required": ["capitals"]}


def decode_rate(model: GgufModel, prompt: list[int], sampling: Sampling) -> tuple[float, int]:
    """Generated tokens per second of one generation (after its first token) and the token count."""
    first = last = None
    count = 0
    for event in model.generate(prompt, sampling):
        if isinstance(event, Delta):
            now = time.perf_counter()
            first = first or now
            last, count = now, event.tokens
        elif isinstance(event, Finish):
            count = event.completion_tokens
    return ((count - 1) / (last - first) if last and first and last > first else 0.0), count


def conversion_cases() -> dict[str, dict]:
    optional = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(MAX_OPTIONAL_PROPERTIES)}}
    return {
        "4,000-value enum": {"enum": list(range(4000))},
        "40 objects x 32 optional properties": {"type": "object", "properties": {f"o{j}": optional for j in range(40)},
                                                "required": [f"o{j}" for j in range(40)]},
        "20,000 keywords (refused)": {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(10_000)}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    model = GgufModel(args.bundle / "model.gguf", n_ctx=1024, threads=args.threads)
    prompt = model.tokenize(model.render_chat(PROMPT), chat=True)
    modes = {"free text": None, "json_schema": schema_grammar(SCHEMA), "json_object": schema_grammar(JSON_OBJECT_GRAMMAR_SCHEMA)}
    rows = []
    for mode, grammar in modes.items():
        sampling = Sampling(max_tokens=args.tokens, temperature=0, grammar=grammar)
        decode_rate(model, prompt, sampling)  # warm: the prompt's KV cache is reused by every run
        rates = [decode_rate(model, prompt, sampling) for _ in range(args.runs)]
        rows.append({"mode": mode, "tok_s": round(statistics.median(r for r, _ in rates), 1), "tokens": rates[0][1]})
    conversions = []
    for name, schema in conversion_cases().items():
        started = time.perf_counter()
        try:
            size: int | str = len(schema_grammar(schema))
        except UnsupportedSchema as exc:
            size = f"refused: {exc.keyword}"
        conversions.append({"schema": name, "ms": round((time.perf_counter() - started) * 1000, 1), "grammar_chars": size})

    print(f"decode, greedy, {model.threads} threads, {args.bundle.name}", file=sys.stderr)
    print(f"{'mode':<14}{'tok/s':>8}{'tokens':>8}")
    for row in rows:
        print(f"{row['mode']:<14}{row['tok_s']:>8}{row['tokens']:>8}")
    print(f"\n{'schema':<40}{'ms':>8}  grammar")
    for row in conversions:
        print(f"{row['schema']:<40}{row['ms']:>8}  {row['grammar_chars']}")
    out = ROOT / "bench-results" / "structured.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bundle": str(args.bundle), "threads": model.threads, "decode": rows,
                               "conversion": conversions}, indent=2))


if __name__ == "__main__":
    main()
