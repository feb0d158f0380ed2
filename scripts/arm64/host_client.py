"""Host side of the arm64 lane: ask the daemon in the board root for one chat completion (streamed) and
one embeddings request with the official openai client, over the network namespace's loopback.

Runs with the host's (x86) Python inside the same network namespace as the daemon, so 127.0.0.1 is
the namespace's own loopback. Waits for /health (bounded), then prints one JSON object.

    python host_client.py --port P --daemon-pid PID --chat-model M --prompt T --max-tokens N
                          --embed-model E --text T [--text T ...] --ready-timeout S --request-timeout S
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
from openai import OpenAI


def alive(pid: int) -> bool:
    """Whether the process runs; an exited child of the waiting shell stays a zombie ("Z") until reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_ready(base: str, daemon_pid: int, timeout_s: float) -> dict:
    """/health once it says ok; fails when the daemon exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive(daemon_pid):
            sys.exit(f"the daemon (pid {daemon_pid}) exited before it was ready; last /health: {last}")
        try:
            response = httpx.get(f"{base}/health", timeout=10)
            last = f"{response.status_code} {response.text[:200]}"
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(1)
    sys.exit(f"the daemon was not ready after {timeout_s:.0f} s; last /health: {last}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--daemon-pid", type=int, required=True)
    parser.add_argument("--chat-model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--embed-model", required=True)
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--ready-timeout", type=float, required=True)
    parser.add_argument("--request-timeout", type=float, required=True)
    args = parser.parse_args()

    base = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    health = wait_ready(base, args.daemon_pid, args.ready_timeout)
    ready_s = time.monotonic() - started
    client = OpenAI(base_url=f"{base}/v1", api_key="unused-on-loopback", timeout=args.request_timeout, max_retries=0)

    started = time.monotonic()
    # Streamed: the daemon sends one chunk per generated token, so the chunks show the board's tokens.
    stream = client.chat.completions.create(
        model=args.chat_model, messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    pieces, finish_reason, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish_reason = choice.finish_reason or finish_reason
    chat_s = time.monotonic() - started
    started = time.monotonic()
    embeddings = client.embeddings.create(model=args.embed_model, input=args.text)
    embed_s = time.monotonic() - started
    print(json.dumps({
        "health": health,
        "ready_s": round(ready_s, 1),
        "chat": {"pieces": pieces, "text": "".join(pieces), "finish_reason": finish_reason, "usage": usage,
                 "seconds": round(chat_s, 1)},
        "embeddings": {"vectors": [item.embedding for item in embeddings.data], "seconds": round(embed_s, 1)},
    }))


if __name__ == "__main__":
    main()
