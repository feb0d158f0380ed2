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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.errors import BundleError, EdgekitError
from edgekit.serve.protocol import FrameSender, read_frame_sync

Send = Callable[[dict[str, Any], bytes], None]


class GenerationRunner:
    """text-generation: ``slots`` llama.cpp contexts over one mmapped GGUF, one thread each."""

    def __init__(self, bundle_dir: Path, manifest, config: dict[str, Any]) -> None:
        from edgekit.runtime.llm import GgufModel
        from edgekit.runtime.verify import model_file

        path = model_file(bundle_dir, manifest)
        context_length = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
        n_ctx = min(config["n_ctx"], context_length) if context_length else config["n_ctx"]
        self.models = [
            GgufModel(path, n_ctx=n_ctx, threads=config.get("threads"), chat_template=manifest.runtime.chat_template,
                      max_prompt_chars=config["max_prompt_chars"])
            for _ in range(config.get("slots", 1))
        ]
        self.models[0].check_template()
        self.facts = {"n_ctx": self.models[0].n_ctx, "chat": self.models[0].template is not None}

    @property
    def slots(self) -> int:
        return len(self.models)

    def handle(self, slot: int, header: dict[str, Any], send: Send, cancelled: Callable[[], bool]) -> None:
        from edgekit.runtime.chat_template import ChatTemplateError
        from edgekit.runtime.llm import Delta, PromptTooLong, Sampling

        model = self.models[slot]
        rid = header["id"]
        try:
            text = model.render_chat(header["messages"]) if "messages" in header else header["prompt"]
        except ChatTemplateError as exc:
            send(_error(rid, 400 if exc.client_error else 500, "chat_template_error", str(exc), "messages"))
            return
        tokens = model.tokenize(text, chat="messages" in header)
        if not tokens:
            send(_error(rid, 400, "empty_prompt", "the prompt is empty", "prompt"))
            return
        if len(tokens) >= model.n_ctx:
            exc = PromptTooLong(len(tokens), model.n_ctx)
            send(_error(rid, 400, "context_length_exceeded", str(exc), "messages" if "messages" in header else "prompt"))
            return
        send({"type": "start", "id": rid, "prompt_tokens": len(tokens)})
        s = header["sampling"]
        sampling = Sampling(max_tokens=s.get("max_tokens"), temperature=s["temperature"], top_p=s["top_p"],
                            seed=s.get("seed"), stop=tuple(s.get("stop") or ()))
        try:
            for event in model.generate(tokens, sampling, cancelled):
                if isinstance(event, Delta):
                    send({"type": "delta", "id": rid, "text": event.text, "tokens": event.tokens})
                else:
                    send({"type": "done", "id": rid, "finish_reason": event.reason, "prompt_tokens": event.prompt_tokens,
                          "completion_tokens": event.completion_tokens, "cached_tokens": event.cached_tokens,
                          "decode_seconds": event.decode_seconds})
        except PromptTooLong as exc:
            send(_error(rid, 400, "context_length_exceeded", str(exc), "messages"))


class EncoderRunner:
    """feature-extraction / text-classification / token-classification with one onnxruntime session."""

    slots = 1

    def __init__(self, bundle_dir: Path, manifest, config: dict[str, Any]) -> None:
        from edgekit.runtime.encoder import EncoderModel
        from edgekit.runtime.verify import model_file

        self.task = manifest.task
        self.config = manifest.runtime
        self.batch_max = config["batch_max"]
        self.batch_tokens = config["batch_max_tokens"]
        self.model = EncoderModel(bundle_dir, manifest.runtime, threads=config.get("threads"),
                                  model_path=model_file(bundle_dir, manifest))
        self.facts = {"max_length": manifest.runtime.max_length, "labels": list(manifest.runtime.labels)}

    def handle(self, slot: int, header: dict[str, Any], send: Send, cancelled: Callable[[], bool]) -> None:
        import numpy as np

        from edgekit.runtime.encoder import pool, softmax

        rid, texts = header["id"], header["texts"]
        outputs, tokens = [], []
        encodings = self.model.tokenizer.encode_batch(texts)  # once; each micro-batch is a slice of it
        batch = self.model.arrays(encodings)
        lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)] if texts else []
        for start, end in self.chunks(lengths):
            longest = max(lengths[start:end])
            hidden, mask = self.model.run({name: array[start:end, :longest] for name, array in batch.items()})
            tokens.extend(lengths[start:end])
            if header["op"] == "embed":
                outputs.append(pool(hidden, mask, self.config.pooling, self.config.normalize).astype(np.float32))
            elif self.task == "text-classification":
                outputs.append(softmax(hidden.astype(np.float64)).astype(np.float32))
            else:
                outputs.extend(self._token_labels(encodings[start:end], softmax(hidden.astype(np.float64)), mask))
        if header["op"] == "embed" or self.task == "text-classification":
            array = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
            send({"type": "result", "id": rid, "shape": list(array.shape), "tokens": tokens}, array.tobytes())
        else:
            send({"type": "result", "id": rid, "entities": outputs, "tokens": tokens})

    def chunks(self, lengths: list[int]) -> list[tuple[int, int]]:
        """Consecutive runs of texts (given by their token counts after truncation) whose padded batch
        (count x longest) stays within ``batch_tokens`` and ``batch_max``.

        Activation memory grows with batch x padded length, so this is what bounds a worker's peak RSS.
        """
        spans, start, longest = [], 0, 0
        for index, length in enumerate(lengths):
            count = index - start
            if count and (count + 1 > self.batch_max or (count + 1) * max(longest, length) > self.batch_tokens):
                spans.append((start, index))
                start, longest = index, 0
            longest = max(longest, length)
        if lengths:
            spans.append((start, len(lengths)))
        return spans

    def _token_labels(self, encodings, probs, mask) -> list[list[dict[str, Any]]]:
        """Per text: each real token (special tokens skipped) with its character span, top label and score."""
        labels = self.config.labels
        result = []
        for row, encoding in enumerate(encodings):
            items = []
            for position, (token, (start, end), special) in enumerate(
                zip(encoding.tokens, encoding.offsets, encoding.special_tokens_mask)
            ):
                if special or not mask[row, position]:
                    continue
                best = int(probs[row, position].argmax())
                items.append({"token": token, "start": start, "end": end,
                              "label": labels[best] if best < len(labels) else str(best),
                              "score": float(probs[row, position, best])})
            result.append(items)
        return result


# Bundle task -> runner class.
RUNNERS: dict[str, type] = {
    "text-generation": GenerationRunner,
    "feature-extraction": EncoderRunner,
    "text-classification": EncoderRunner,
    "token-classification": EncoderRunner,
}

# Ops a runner answers, by task.
OPS: dict[str, tuple[str, ...]] = {
    "text-generation": ("generate",),
    "feature-extraction": ("embed",),
    "text-classification": ("classify",),
    "token-classification": ("classify",),
}


def _error(rid: str | None, status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"type": "error", "id": rid, "status": status, "code": code, "message": message, "param": param}


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
        manifest = verify_for_runtime(bundle_dir)
        runner = RUNNERS[manifest.task](bundle_dir, manifest, config)
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
                send(_error(header.get("id"), 400, "unsupported_operation", f"this model does not do {kind!r}"))

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
                send(_error(rid, 500, "model_error", str(exc)))
            except Exception as exc:  # a bug: report it to this request and keep serving the others
                traceback.print_exc()
                send(_error(rid, 500, "internal_error", f"{type(exc).__name__}: {exc}"))
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
