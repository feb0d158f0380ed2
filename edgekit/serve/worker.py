"""A model worker: one subprocess per loaded model, so a native crash takes down only that model.

Run by the daemon as ``python -m edgekit.serve.worker serve --fd N --bundle DIR --config JSON``
with one end of a Unix socket pair; it verifies the bundle again (the files may have changed since
the daemon listed them), loads it, says ``ready`` and then answers requests (see ``protocol.py``).
``python -m edgekit.serve.worker verify DIR...`` checks bundles and prints one JSON line each,
so the daemon never parses a model file in its own process.

The worker ignores SIGINT/SIGTERM: the daemon decides when it stops (after its grace period), and
it exits by itself when the daemon's end of the socket closes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from edgekit.errors import BundleError, EdgekitError
from edgekit.serve.protocol import FrameSender, read_frame_sync
from edgekit.serve.runners import OPS, error_frame, load_plugins, runner_for


def serve(fd: int, bundle_dir: Path, config: dict[str, Any]) -> int:
    """Load the bundle and answer requests until the daemon says shutdown or goes away."""
    from edgekit.runtime.verify import verify_for_runtime

    sock = socket.socket(fileno=fd)
    sender = FrameSender(sock)

    def send(header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            sender.send(header, payload)
        except OSError:
            os._exit(0)  # the daemon is gone; nobody is waiting for this work

    started = time.perf_counter()
    try:
        load_plugins(config.get("plugins", []))
        manifest = verify_for_runtime(bundle_dir)
        runner = runner_for(manifest.format)(bundle_dir, manifest, config)
    except EdgekitError as exc:
        send({"type": "load_error", "message": str(exc), "bundle": isinstance(exc, BundleError)})
        return 1
    send({"type": "ready", "pid": os.getpid(), "task": manifest.task, "load_seconds": time.perf_counter() - started,
          **runner.facts})

    work: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancelled: dict[str, threading.Event] = {}
    lock = threading.Lock()
    allowed = OPS[manifest.task]

    def read_loop() -> None:
        stream = sock.makefile("rb")
        while True:
            frame = read_frame_sync(stream)
            if frame is None:
                os._exit(0)  # the daemon closed its end (it exited or dropped this worker)
            header, _ = frame
            kind = header["type"]
            if kind == "cancel":
                with lock:
                    event = cancelled.get(header["id"])
                if event is not None:
                    event.set()
            elif kind == "shutdown":
                for _ in range(runner.slots):
                    work.put(None)
                return
            elif kind in allowed:
                with lock:
                    cancelled[header["id"]] = threading.Event()
                work.put(header)
            else:
                send(error_frame(header.get("id"), 400, "unsupported_operation", f"this model does not do {kind!r}"))

    def slot_loop(slot: int) -> None:
        while (header := work.get()) is not None:
            rid = header["id"]
            with lock:
                event = cancelled.get(rid)
            try:
                if event is None or not event.is_set():
                    runner.handle(slot, header, send, event.is_set if event else (lambda: False))
                else:
                    send({"type": "done", "id": rid, "finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0})
            except EdgekitError as exc:
                send(error_frame(rid, 500, "model_error", str(exc)))
            except Exception as exc:  # a bug: report it to this request and keep serving the others
                traceback.print_exc()
                send(error_frame(rid, 500, "internal_error", f"{type(exc).__name__}: {exc}"))
            finally:
                with lock:
                    cancelled.pop(rid, None)

    threads = [threading.Thread(target=slot_loop, args=(slot,), name=f"slot-{slot}", daemon=True) for slot in range(runner.slots)]
    for thread in threads:
        thread.start()
    read_loop()
    for thread in threads:
        thread.join()
    send({"type": "bye"})
    return 0


def verify(paths: list[Path]) -> int:
    """Check each bundle; print one JSON object per line: dir, ok, name, task, format, error."""
    from edgekit.runtime.verify import verify_for_runtime

    for path in paths:
        row: dict[str, Any] = {"dir": str(path), "ok": False, "name": path.name, "task": None, "format": None, "error": None}
        try:
            manifest = verify_for_runtime(path)
            row.update(ok=True, name=manifest.name, task=manifest.task, format=manifest.format)
        except EdgekitError as exc:
            row["error"] = str(exc)
        print(json.dumps(row), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="edgekit-worker")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("--fd", type=int, required=True)
    serve_cmd.add_argument("--bundle", type=Path, required=True)
    serve_cmd.add_argument("--config", type=json.loads, default={})
    verify_cmd = commands.add_parser("verify")
    verify_cmd.add_argument("bundles", type=Path, nargs="*")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.bundles)
    return serve(args.fd, args.bundle, args.config)


if __name__ == "__main__":
    sys.exit(main())
