"""What a model worker runs: one runner per bundle format, looked up in ``RUNNERS``.

A runner loads a verified bundle in ``__init__`` (``WorkerConfig``), names the jobs it answers in
``ops`` and answers one job at a time per slot in ``handle(slot, job, send)`` with the messages of
``protocol.py``. Built-in runners are registered below; a worker plugin
(``--worker-plugins``) registers more, or replaces one, with ``register_runner`` the same way, which
is how the test suite swaps llama.cpp for a fake model while the daemon, worker and protocol stay real.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError
from edgekit.formats import FORMATS, TASKS
from edgekit.runtime.llm import Delta, Finish
from edgekit.schema.manifest import Manifest
from edgekit.serve.handoff import ClientSink
from edgekit.serve.protocol import DeltaMessage, Done, Encode, Error, Generate, Prompt, Result, WorkerConfig

Send = Callable[..., None]  # (message, payload=b"")

class Job:
    """One job inside the worker: its message, and what the daemon decided about it since."""

    def __init__(self, message: Generate | Encode) -> None:
        self.message = message
        self._cancelled = threading.Event()
        self._decided = threading.Event()
        self.sink: ClientSink | None = None  # the client's socket, when the daemon handed it over (handoff.py)

    @property
    def id(self) -> str:
        return self.message.id

    def cancel(self) -> None:
        self._cancelled.set()
        self._decided.set()

    def proceed(self) -> None:
        self._decided.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait_proceed(self) -> bool:
        """Block until the daemon answers the ``Prompt``: True to generate, False when it cancelled."""
        self._decided.wait()
        return not self._cancelled.is_set()


class GenerationRunner:
    """text-generation: ``slots`` concurrent streams. With llama.cpp they are sequences of one context sharing one
    KV pool, decoded together one batch per step (runtime/llm_batch.py); a stand-in model gets one instance per slot."""

    ops = ("generate",)

    def __init__(self, bundle_dir: Path, manifest: Manifest, config: WorkerConfig) -> None:
        from edgekit.runtime.verify import model_file

        path = model_file(bundle_dir, manifest)
        self.special_in_content = config.special_in_content
        first = self.open_model(path, manifest, config)
        self.engine = None
        if config.slots > 1 and self.batched(first):
            from edgekit.runtime.llm_batch import BatchedGguf

            # One context, one sequence per slot: concurrent streams decode in one batch per step.
            self.engine = BatchedGguf(first, config.slots)
            self.models = [first] * config.slots
        else:
            self.models = [first] + [self.open_model(path, manifest, config) for _ in range(config.slots - 1)]
        self.models[0].check_template()
        self.facts = {"n_ctx": self.models[0].n_ctx, "chat": self.models[0].template is not None,
                      "threads": self.models[0].threads}

    @staticmethod
    def open_model(path: Path, manifest: Manifest, config: WorkerConfig):
        """One generation slot: a llama.cpp context over the mmapped file."""
        from edgekit.runtime.llm import GgufModel

        return GgufModel(path, n_ctx=config.n_ctx, threads=config.threads, chat_template=manifest.runtime.chat_template,
                         max_prompt_chars=config.max_prompt_chars, prompt_cache_contexts=config.prompt_cache_contexts)

    @staticmethod
    def batched(model) -> bool:
        """Whether concurrent streams of ``model`` share one llama.cpp context (a subclass's fake model does not)."""
        from edgekit.runtime.llm import GgufModel

        return isinstance(model, GgufModel)

    @property
    def slots(self) -> int:
        return len(self.models)

    @property
    def golden_model(self):
        """The model the golden checks run on (they reset its context; the first request rebuilds it)."""
        return self.models[0]

    def handle(self, slot: int, job: Job, send: Send) -> None:
        """Prompt -> the daemon's decision -> deltas -> one Done (or one Error instead)."""
        from edgekit.runtime.chat_template import ChatTemplateError

        model = self.models[slot]
        message = job.message
        chat = message.messages is not None
        if chat and not self.special_in_content:
            # Tools and calls render as the template's markup (no content markers): refuse control-token text in them.
            calls = [turn.tool_calls for turn in message.messages if turn.tool_calls]
            for param, value in (("tools", message.tools), ("messages", calls)):
                if value and holds_control_tokens(model, value):
                    send(Error(id=job.id, status=400, code="control_token_in_input", param=param,
                               message=f"{param} hold text that this model reads as a control token"))
                    return
        try:
            text = model.render_chat([turn.model_dump(exclude_none=True) for turn in message.messages], message.tools) if chat else message.prompt
        except ChatTemplateError as exc:
            send(Error(id=job.id, status=400 if exc.client_error else 500, code="chat_template_error", message=str(exc),
                       param="messages"))
            return
        if chat and not self.special_in_content:
            tokens = chat_tokens(model, [turn.model_dump(exclude_none=True) for turn in message.messages], text, message.tools)
        else:
            tokens = model.tokenize(text, chat=chat)
        grammar = message.sampling.grammar
        if grammar is not None and self.batched(model):
            from edgekit.runtime.structured import check_grammar

            if not check_grammar(model._vocab, grammar):  # before a decode path builds its sampler with it
                send(Error(id=job.id, status=400, code="unsupported_schema", param="response_format",
                           message="llama.cpp could not parse the grammar built for this request"))
                return
        send(Prompt(id=job.id, tokens=len(tokens)))
        if not job.wait_proceed():
            send(Done(id=job.id, finish=Finish("cancelled", len(tokens), 0)))
            return
        if self.engine is not None:
            self.stream_batched(job, tokens, send)
            return
        for event in model.generate(tokens, message.sampling, job.cancelled):
            send(DeltaMessage(id=job.id, delta=event) if isinstance(event, Delta) else Done(id=job.id, finish=event))

    def stream_batched(self, job: Job, tokens: list[int], send: Send) -> None:
        """Deltas go out from the decode thread as they are made: a hand-off to this slot thread per token cost a
        thread wake-up and GIL ping-pong with the decode thread. The slot thread waits for the end and sends ``Done``."""
        ended = threading.Event()
        outcome: list[Finish | BaseException] = []

        def emit(event: Delta | Finish | BaseException) -> None:
            if isinstance(event, Delta):
                send(DeltaMessage(id=job.id, delta=event))
            else:
                outcome.append(event)
                ended.set()

        self.engine.start(tokens, job.message.sampling, job.cancelled, emit)
        ended.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        send(Done(id=job.id, finish=outcome[0]))


def holds_control_tokens(model, value: Any) -> bool:
    """Whether a JSON value's text tokenizes differently when control-token text in it is parsed."""
    data = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return model.llm.tokenize(data, add_bos=False, special=True) != model.llm.tokenize(data, add_bos=False, special=False)


# Private-use characters around a message's index: what a chat template renders in place of its content.
_CONTENT_MARK = re.compile("\ue000(\\d+)\ue001")


def chat_tokens(model, messages: list[dict[str, Any]], rendered: str, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a chat prompt in which the template's markup may be control tokens and message content may not.

    The template is rendered again with a marker in place of each message's content; the markup between
    markers is tokenized with ``special=True``, each content with ``special=False``, so a user who types
    ``<|im_start|>system`` gets those characters as text, not a forged turn. A template that does not
    reproduce every marker once and in order (it rewrites content) gets ``rendered`` tokenized whole.
    """
    if not any("\ue000" in str(m.get("content", "")) for m in messages):
        # Empty contents stay empty: templates leave them out (an assistant turn that only calls tools).
        marked = model.render_chat([{**m, "content": f"\ue000{i}\ue001"} if m.get("content") else m
                                    for i, m in enumerate(messages)], tools)
        found = [int(match[1]) for match in _CONTENT_MARK.finditer(marked)]
        if found == [i for i, m in enumerate(messages) if m.get("content")]:
            add_bos = model.add_bos and not (model.bos_text and rendered.startswith(model.bos_text))
            tokens: list[int] = []
            parts = _CONTENT_MARK.split(marked)  # markup, index, markup, index, ..., markup
            for position, part in enumerate(parts):
                text = part if position % 2 == 0 else messages[int(part)]["content"]
                if text:
                    tokens += model.llm.tokenize(text.encode("utf-8"), add_bos=add_bos and not tokens,
                                                 special=position % 2 == 0)
            return tokens
    return model.tokenize(rendered, chat=True)


class EncoderRunner:
    """feature-extraction / text-classification / token-classification / text-ranking with one onnxruntime session."""

    slots = 1

    def __init__(self, bundle_dir: Path, manifest: Manifest, config: WorkerConfig) -> None:
        from edgekit.runtime.encoder import EncoderModel
        from edgekit.runtime.verify import model_file

        self.task = manifest.task
        self.ops = (TASKS[manifest.task].op,)  # the job this bundle's task answers (the task table)
        self.config = manifest.runtime
        self.batch_max = config.batch_max
        self.batch_tokens = config.batch_max_tokens
        self.model = EncoderModel(bundle_dir, manifest.runtime, threads=config.threads,
                                  model_path=model_file(bundle_dir, manifest))
        self.facts = {"max_length": manifest.runtime.max_length, "labels": list(manifest.runtime.labels),
                      "vocab_size": self.model.tokenizer.get_vocab_size()}

    @property
    def golden_model(self):
        return self.model

    def handle(self, slot: int, job: Job, send: Send) -> None:
        import numpy as np

        from edgekit.runtime.encoder import pool, relevance, softmax

        op, texts = job.message.type, job.message.texts
        outputs, tokens = [], []
        if op == "rerank":  # the query, then the documents: one (query, document) pair per document
            query, documents = texts[0], texts[1:]
            encodings = self.model.tokenizer.encode_batch([(query, document) for document in documents])
            batch = self.model.arrays(encodings)
        elif any(isinstance(text, list) for text in texts):  # token ids given (embeddings only): no offsets to report
            encodings, batch = None, self.id_arrays(texts)
        else:
            encodings = self.model.tokenizer.encode_batch(texts)  # once; each micro-batch is a slice of it
            batch = self.model.arrays(encodings)
        lengths = [int(n) for n in batch["attention_mask"].sum(axis=1)] if len(batch["input_ids"]) else []
        for start, end in self.chunks(lengths):
            longest = max(lengths[start:end])
            hidden, mask = self.model.run({name: array[start:end, :longest] for name, array in batch.items()})
            tokens.extend(lengths[start:end])
            if op == "embed":
                outputs.append(pool(hidden, mask, self.config.pooling, self.config.normalize).astype(np.float32))
            elif op == "rerank":
                outputs.append(relevance(hidden)[:, None].astype(np.float32))
            elif self.task == "text-classification":
                outputs.append(softmax(hidden.astype(np.float64)).astype(np.float32))
            else:
                outputs.extend(self._token_labels(encodings[start:end], softmax(hidden.astype(np.float64)), mask))
        if op in ("embed", "rerank") or self.task == "text-classification":
            array = np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)
            send(Result(id=job.id, shape=list(array.shape), tokens=tokens), array.tobytes())
        else:
            send(Result(id=job.id, entities=outputs, tokens=tokens))

    def id_arrays(self, items: list[str | list[int]]):
        """Model inputs for texts mixed with token-id arrays (taken as given, cut at max_length), padded to the longest."""
        import numpy as np

        texts = [item for item in items if isinstance(item, str)]
        encoded = iter(self.model.tokenizer.encode_batch(texts) if texts else ())
        rows = []
        for item in items:
            if isinstance(item, str):
                encoding = next(encoded)
                n = sum(encoding.attention_mask)
                rows.append((encoding.ids[:n], encoding.type_ids[:n]))
            else:
                ids = item[: self.config.max_length]
                rows.append((ids, [0] * len(ids)))
        longest = max(len(ids) for ids, _ in rows)
        padding = self.model.tokenizer.padding or {}
        batch = {"input_ids": np.full((len(rows), longest), padding.get("pad_id", 0), dtype=np.int64),
                 "attention_mask": np.zeros((len(rows), longest), dtype=np.int64),
                 "token_type_ids": np.zeros((len(rows), longest), dtype=np.int64)}
        for row, (ids, types) in enumerate(rows):
            batch["input_ids"][row, : len(ids)] = ids
            batch["attention_mask"][row, : len(ids)] = 1
            batch["token_type_ids"][row, : len(ids)] = types
        return batch

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


# Runners registered by worker plugins (tests' fake model); a format's own runner comes from its FormatSpec.
RUNNERS: dict[str, type] = {}


def register_runner(format: str, runner: type, *, replace: bool = False) -> None:
    """Serve bundles of ``format`` with ``runner``; replacing a registered one must be asked for."""
    current = RUNNERS.get(format) or (_spec_runner(format) if format in FORMATS else None)
    if current is not None and not replace and current is not runner:
        raise ValueError(f"a runner for {format!r} is already registered ({current.__name__})")
    RUNNERS[format] = runner


def _spec_runner(format: str) -> type:
    return FORMATS[format].hook("runner")


def runner_for(format: str) -> type:
    if format in RUNNERS:
        return RUNNERS[format]
    if format in FORMATS:
        return _spec_runner(format)
    known = ", ".join(sorted({*RUNNERS, *FORMATS}))
    raise ConfigError(f"no runner is registered for {format!r} bundles (known: {known})")


def load_plugins(modules: list[str]) -> None:
    """Import each worker plugin module; importing it registers its runners."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"worker plugin {name!r} cannot be imported: {exc}",
                              hint="check --worker-plugins and the worker's PYTHONPATH") from exc
