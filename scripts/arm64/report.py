"""Judge one run of scripts/arm64-check.sh from the files its steps left in the run folder.

Prints a table (stdout) and writes the JSON result; exit 0 only when every check of every board
passed. Per board:
- install.sh exits 0 with no network;
- `edgekit doctor` exits 0: every golden check of every bundle passed (for the GGUF sample, doctor
  accepts identical greedy ids or, where kernels round differently, its top-1/KLD bounds; whether each
  recorded prompt's ids were identical on the core is reported beside it, not required: the same
  prompt differs between x86 builds too, AVX2 against the AVX-512 build that recorded it);
- the greedy token ids of the served chat completion (streamed: one chunk per token, each chunk's text
  belonging to one token of the vocabulary) equal x86's for the same request, and so does the text;
- the served embeddings pass the bundle's own export gates against the PyTorch fp32 model, with
  their cosine to x86's int8 output reported beside them;
- the daemon exits 0 on SIGTERM.
And the refusal board's pack is refused on the other core by install.sh (nothing installed) and by
doctor (exit 3), both naming the missing feature, neither by a signal.

Why the served embeddings are not held to cosine >= 0.999 with x86's int8 output: onnxruntime's
block-int8 MatMulNBits takes another path on a core without dot product; measured on the two lane
sentences a Cortex-A72 lands at 0.9989-0.9990 from x86 while being closer to the fp32 model
(0.9993-0.9996) than x86 is (0.9984-0.9987).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

SIGNAL_EXIT = 128  # a shell reports death by signal N as 128 + N (SIGILL: 132)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def steps(path: Path) -> dict[str, dict]:
    """NAME -> {seconds, exit, cpu_seconds} from a steps.tsv (the last record of a name wins)."""
    table = {}
    for line in read_text(path).splitlines():
        name, seconds, code, cpu = line.rsplit("\t", 3)
        table[name] = {"seconds": float(seconds), "exit": int(code), "cpu_seconds": float(cpu)}
    return table


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def cosines(vectors: list[list[float]] | None, reference: list[list[float]]) -> list[float] | None:
    if not vectors or len(vectors) != len(reference):
        return None
    return [round(cosine(a, b), 6) for a, b in zip(vectors, reference)]


def check(passed: bool | None, **facts) -> dict:
    return {"passed": bool(passed), **facts}


def embeddings_check(vectors: list[list[float]] | None, x86: dict) -> dict:
    """The bundle's export gates against the fp32 model; the cosine to x86's int8 output as a fact."""
    to_fp32 = cosines(vectors, x86["fp32"])
    each, mean = x86["gates"].get("min_cosine_each", -1.0), x86["gates"].get("min_cosine_mean", -1.0)
    passed = to_fp32 is not None and min(to_fp32) >= each and sum(to_fp32) / len(to_fp32) >= mean
    return check(passed, cosine_fp32=to_fp32, gates=x86["gates"], cosine_x86_int8=cosines(vectors, x86["int8"]))


def doctor_bundle(report: dict | None, name: str) -> dict:
    for bundle in (report or {}).get("bundles", []):
        if bundle.get("name") == name:
            return bundle
    return {}


def golden_ids(report: dict | None, chat_bundle: str) -> dict:
    """Per recorded prompt of the GGUF sample: greedy ids identical to x86's record, and doctor's words."""
    golden = doctor_bundle(report, chat_bundle).get("golden") or {}
    prompts = golden.get("checks") or []
    return {"recorded_on": golden.get("recorded_on"),
            "identical": [bool(c.get("ids_equal")) and bool(c.get("prompt_ids_equal")) for c in prompts],
            "detail": [c.get("detail") for c in prompts]}


def served_ids_check(chat: dict, x86: dict) -> dict:
    """The streamed chunks are x86's tokens' texts, one each, every text a single vocabulary entry: same ids."""
    pieces = chat.get("pieces")
    expected = [p["text"] for p in x86["pieces"]]
    derivable = all(p["unique"] for p in x86["pieces"])
    same = pieces == expected and derivable
    tokens = (chat.get("usage") or {}).get("completion_tokens")
    return check(same and tokens == len(expected) and chat.get("text") == x86["text"],
                 ids=[p["id"] for p in x86["pieces"]] if same else None, text=chat.get("text"), completion_tokens=tokens,
                 ids_derivable=derivable)


def judge_board(folder: Path, x86: dict, chat_bundle: str, embed_bundle: str) -> dict:
    ran = steps(folder / "steps.tsv")
    exit_of = lambda name: ran.get(name, {}).get("exit")  # noqa: E731
    pack = read_json(folder / "pack.json") or {}
    doctor = read_json(folder / "doctor.json")
    client = read_json(folder / "client.json") or {}
    serve_exit = read_text(folder / "serve-exit").strip()
    checks = {
        "offline": check(exit_of("offline") == 0),
        "install": check(exit_of("install") == 0, exit=exit_of("install")),
        "doctor": check(exit_of("doctor") == 0, exit=exit_of("doctor"),
                        bundles={b.get("name"): b.get("exit_code") for b in (doctor or {}).get("bundles", [])}),
        "served_ids_equal_x86": served_ids_check(client.get("chat") or {}, x86["greedy"]),
        "served_embeddings_gates": embeddings_check((client.get("embeddings") or {}).get("vectors"), x86["embeddings"]),
        "sigterm_exit_0": check(serve_exit == "0", exit=int(serve_exit) if serve_exit.lstrip("-").isdigit() else None),
    }
    onnx_golden = (doctor_bundle(doctor, embed_bundle).get("golden") or {}).get("checks") or []
    return {
        "core": read_text(folder / "core").strip(),
        "hwcaps": read_text(folder / "hwcaps.txt").split(),
        "pack": {k: pack.get(k) for k in ("pack_id", "target", "cpu_features", "bytes", "seconds", "llama_build_cached")},
        "steps": ran,
        "checks": checks,
        "doctor_golden_ids": golden_ids(doctor, chat_bundle),
        "doctor_onnx_cosines": [c.get("cosine") for c in onnx_golden],
        "client_seconds": {"ready": client.get("ready_s"), "chat": (client.get("chat") or {}).get("seconds"),
                           "embeddings": (client.get("embeddings") or {}).get("seconds")},
        "passed": all(c["passed"] for c in checks.values()),
    }


def judge_refusal(folder: Path, core: str, feature: str) -> dict:
    ran = steps(folder / "steps.tsv")
    install_log = read_text(folder / "refuse-install.log")
    doctor_out = read_text(folder / "refuse-doctor.log") + read_text(folder / "refuse-doctor.json")
    install_exit = ran.get("refuse-install", {}).get("exit")
    doctor_exit = ran.get("refuse-doctor", {}).get("exit")
    prefix = read_text(folder / "refuse-install-prefix").strip()
    checks = {
        # refused with a message, not by a signal (a SIGILL would be 132), and nothing installed
        "install_refused": check(install_exit not in (None, 0) and install_exit < SIGNAL_EXIT and feature in install_log
                                 and prefix == "absent", exit=install_exit, prefix=prefix,
                                 message=[line for line in install_log.splitlines() if feature in line][:1]),
        "doctor_refused": check(doctor_exit == 3 and feature in doctor_out, exit=doctor_exit,
                                message=[line for line in doctor_out.splitlines() if feature in line][:1]),
    }
    return {"core": core, "feature": feature, "hwcaps": read_text(folder / "refuse-hwcaps.txt").split(), "checks": checks,
            "passed": all(c["passed"] for c in checks.values())}


def mark(passed: bool) -> str:
    return "ok" if passed else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boards", nargs="+", required=True)
    parser.add_argument("--chat-bundle", type=Path, required=True, help="the GGUF sample bundle (its golden record)")
    parser.add_argument("--embed-bundle", required=True, help="the ONNX sample's bundle name")
    parser.add_argument("--refuse-board", required=True)
    parser.add_argument("--refuse-core", required=True)
    parser.add_argument("--refuse-feature", required=True)
    parser.add_argument("--root-cached", choices=("true", "false"), required=True)
    parser.add_argument("--bundles-cached", choices=("true", "false"), required=True)
    parser.add_argument("--total-seconds", type=float, required=True)
    parser.add_argument("--cpu-seconds", type=float, required=True, help="user + system CPU seconds of the whole run")
    args = parser.parse_args()

    x86 = read_json(args.run / "x86.json")
    manifest = read_json(args.chat_bundle / "manifest.json") or {}
    if not x86:
        print(f"no x86 reference in {args.run}", file=sys.stderr)
        return 1
    chat = args.chat_bundle.name
    boards = {board: judge_board(args.run / board, x86, chat, args.embed_bundle) for board in args.boards}
    refusal = (judge_refusal(args.run / args.refuse_board, args.refuse_core, args.refuse_feature)
               if args.refuse_board in args.boards else None)
    llama_cached = all(b["pack"].get("llama_build_cached") for b in boards.values())
    cached = args.root_cached == "true" and args.bundles_cached == "true" and llama_cached
    recorded = [{"prompt": p["prompt"], "ids": p["ids"]} for p in (manifest.get("golden") or {}).get("prompts", [])]
    result = {
        "when": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "host": platform.machine(),
        "caches": {"root": args.root_cached == "true", "bundles": args.bundles_cached == "true", "llama_builds": llama_cached},
        "run": "cached" if cached else "fresh (something was built)",
        "total_seconds": round(args.total_seconds, 1),
        "cpu_seconds": round(args.cpu_seconds, 1),
        "host_steps": steps(args.run / "host-steps.tsv"),
        "x86": {"golden_ids": recorded, "served_request": x86["greedy"]},
        "boards": boards,
        "refusal": refusal,
        "passed": all(b["passed"] for b in boards.values()) and (refusal is None or refusal["passed"]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    names = list(next(iter(boards.values()))["checks"])
    header = ["board", "core", "llama build", *names, "lane s", "CPU s"]
    rows = [[board, b["core"], str(b["pack"].get("target")), *(mark(b["checks"][n]["passed"]) for n in names),
             f"{sum(s['seconds'] for s in b['steps'].values()):.0f}", f"{sum(s['cpu_seconds'] for s in b['steps'].values()):.0f}"]
            for board, b in boards.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\n{chat}: greedy ids recorded on x86 ({manifest.get('golden', {}).get('recorded_on')}) and doctor's verdict per core:")
    for index, prompt in enumerate(recorded):
        print(f"  prompt {index + 1} {prompt['ids']}")
        for board, b in boards.items():
            detail = b["doctor_golden_ids"]["detail"]
            print(f"    {board}: {detail[index] if index < len(detail) else 'not checked'}")
    print(f"served request on x86: {x86['greedy']['ids']} = {x86['greedy']['text']!r}")
    for board, b in boards.items():
        print(f"  {board}: {b['checks']['served_ids_equal_x86']['ids']}")
    for board, b in boards.items():
        c = b["checks"]["served_embeddings_gates"]
        fmt = lambda values: ", ".join(f"{v:.4f}" for v in values) if values else "-"  # noqa: E731
        print(f"{board}: served embeddings cosine to fp32 {fmt(c['cosine_fp32'])} (gates {c['gates']}), to x86 int8 "
              f"{fmt(c['cosine_x86_int8'])}; doctor's ONNX golden cosines {fmt([v for v in b['doctor_onnx_cosines'] if v is not None])}")
    if refusal:
        for name, c in refusal["checks"].items():
            print(f"{args.refuse_board} pack on {args.refuse_core}: {name} {mark(c['passed'])} (exit {c['exit']}): "
                  f"{' | '.join(c['message'])}")
    print(f"\n{result['run']}: {result['total_seconds']:.0f} s in all, {result['cpu_seconds']:.0f} CPU s; result {mark(result['passed'])} -> {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
