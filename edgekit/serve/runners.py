"""What a model worker runs: one runner per bundle format, looked up in ``RUNNERS``.

A runner loads a verified bundle in ``__init__`` and answers one request at a time per slot in
``handle(slot, header, send, cancelled)``. Built-in runners are registered below; a worker plugin
(``--worker-plugins``) registers more, or replaces one, with ``register_runner`` the same way, which
is how the test suite swaps llama.cpp for a fake model while the daemon, worker and protocol stay real.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError

Send = Callable[[dict[str, Any], bytes], None]


class GenerationRunner:
    """text-generation: ``slots`` llama.cpp contexts over one mmapped GGUF, one thread each."""

    def __init__(self, bundle_dir: Path, manifest, config: dict[str, Any]) -> None:
        from edgekit.runtime.verify import model_file

        path = model_file(bundle_dir, manifest)
        context_length = manifest.runtime.context_length or (manifest.gguf.context_length if manifest.gguf else None)
        n_ctx = min(config["n_ctx"], context_length) if context_length else config["n_ctx"]
        self.models = [self.open_model(path, manifest, n_ctx, config) for _ in range(config.get("slots", 1))]
        self.models[0].check_template()
        self.facts = {"n_ctx": self.models[0].n_ctx, "chat": self.models[0].template is not None}

    @staticmethod
    def open_model(path: Path, manifest, n_ctx: int, config: dict[str, Any]):
        """One generation slot: a llama.cpp context over the mmapped file."""
        from edgekit.runtime.llm import GgufModel

        return GgufModel(path, n_ctx=n_ctx, threads=config.get("threads"), chat_template=manifest.runtime.chat_template,
                         max_prompt_chars=config["max_prompt_chars"])

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
            send(error_frame(rid, 400 if exc.client_error else 500, "chat_template_error", str(exc), "messages"))
            return
        tokens = model.tokenize(text, chat="messages" in header)
        if not tokens:
            send(error_frame(rid, 400, "empty_prompt", "the prompt is empty", "prompt"))
            return
        if len(tokens) >= model.n_ctx:
            exc = PromptTooLong(len(tokens), model.n_ctx)
            send(error_frame(rid, 400, "context_length_exceeded", str(exc), "messages" if "messages" in header else "prompt"))
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
            send(error_frame(rid, 400, "context_length_exceeded", str(exc), "messages"))


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


def error_frame(rid: str | None, status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"type": "error", "id": rid, "status": status, "code": code, "message": message, "param": param}


# Bundle format -> runner class (built-ins; plugins add rows with ``register_runner``).
RUNNERS: dict[str, type] = {
    "gguf": GenerationRunner,
    "onnx": EncoderRunner,
}

# Ops a runner answers, by task.
OPS: dict[str, tuple[str, ...]] = {
    "text-generation": ("generate",),
    "feature-extraction": ("embed",),
    "text-classification": ("classify",),
    "token-classification": ("classify",),
}


def register_runner(format: str, runner: type, *, replace: bool = False) -> None:
    """Serve bundles of ``format`` with ``runner``; replacing a registered one must be asked for."""
    if format in RUNNERS and not replace and RUNNERS[format] is not runner:
        raise ValueError(f"a runner for {format!r} is already registered ({RUNNERS[format].__name__})")
    RUNNERS[format] = runner


def runner_for(format: str) -> type:
    try:
        return RUNNERS[format]
    except KeyError:
        raise ConfigError(f"no runner is registered for {format!r} bundles (known: {', '.join(sorted(RUNNERS))})") from None


def load_plugins(modules: list[str]) -> None:
    """Import each worker plugin module; importing it registers its runners."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"worker plugin {name!r} cannot be imported: {exc}",
                              hint="check --worker-plugins and the worker's PYTHONPATH") from exc
