"""Concurrent generations of one GGUF model decoded together: one llama.cpp context, one sequence per stream,
one llama_decode per step carrying the next token of every stream (and a slice of a new prompt).

Decoding is bound by streaming the weights through the cores once per step, so N tokens in one step cost
little more than one. A new request goes to the free sequence whose cached tokens share the longest prefix
with its prompt; only the rest is decoded. Text, stop strings, limits and cancellation are the single-stream
rules (``TextStream``), applied by the decode thread between steps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import RuntimeBackendError
from edgekit.runtime.llm import PREFILL_CHUNK, Delta, Finish, GgufModel, PromptTooLong, Sampling, TextStream, common_prefix


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    cancelled: Callable[[], bool]
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    seq: int = -1
    pending: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    cached: int = 0
    next_token: int | None = None
    chain: Any = None
    text: TextStream | None = None
    started: float = 0.0


class BatchedGguf:
    """``sequences`` generations at once in one llama.cpp context of ``sequences`` x the model's n_ctx cells."""

    def __init__(self, model: GgufModel, sequences: int) -> None:
        from llama_cpp._internals import LlamaContext

        self.model, self.sequences = model, sequences
        llama_cpp, llm = model._llama_cpp, model.llm
        self._llama_cpp = llama_cpp
        params = llm.context_params
        params.n_seq_max = sequences
        params.n_ctx = model.n_ctx * sequences  # not unified: each sequence gets n_ctx cells
        old, llm._ctx = llm._ctx, LlamaContext(model=llm._model, params=params, verbose=False)
        old.close()
        llm.reset()
        self._saved, model.prompt_cache = model.prompt_cache, None  # saved prompts serve every sequence
        self._memory = llama_cpp.llama_get_memory(llm.ctx)
        self._batch = llama_cpp.llama_batch_init(PREFILL_CHUNK + sequences, 0, 1)
        self._kv: list[list[int]] = [[] for _ in range(sequences)]  # tokens in each sequence's cells
        self._free = set(range(sequences))
        self._used = [0] * sequences  # when each sequence was last given a request (LRU choice)
        self._uses = 0
        self._waiting: list[_Request] = []
        self._active: dict[int, _Request] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._llama_cpp.llama_batch_free(self._batch)

    def generate(self, prompt: list[int], sampling: Sampling,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Delta | Finish]:
        """``GgufModel.generate`` for one of the concurrent streams."""
        model = self.model
        if not prompt:
            raise RuntimeBackendError("empty prompt")
        if len(prompt) >= model.n_ctx:
            raise PromptTooLong(len(prompt), model.n_ctx)
        request = _Request(list(prompt), sampling, cancelled)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify()
        while True:
            event = request.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finish):
                return

    # ---- the decode thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._active or (self._waiting and self._free)):
                    self._cond.wait()
                if self._closed:
                    return
                while self._waiting and self._free:
                    self._assign(self._waiting.pop(0))
            try:
                self._step()
            except RuntimeBackendError as exc:
                for request in list(self._active.values()):
                    self._release(request)
                    request.events.put(exc)

    def _assign(self, request: _Request) -> None:
        """The free sequence sharing the longest prefix with the prompt when that is at least half of it, else the
        least recently used one (llama-server's slot choice); its cells past the shared prefix are dropped."""
        llama_cpp = self._llama_cpp
        best = max(sorted(self._free), key=lambda s: common_prefix(self._kv[s], request.prompt))
        if 2 * common_prefix(self._kv[best], request.prompt) >= len(request.prompt):
            seq = best
        else:
            seq = min(self._free, key=lambda s: self._used[s])
        self._free.discard(seq)
        self._uses += 1
        self._used[seq] = self._uses
        keep = common_prefix(self._kv[seq], request.prompt)
        if self._saved is not None:
            keep = self._swap_prompt(seq, request.prompt, keep)
        keep = min(keep, len(request.prompt) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            keep = 0
        del self._kv[seq][keep:]
        room = self.model.n_ctx - len(request.prompt)
        request.seq, request.cached, request.pending = seq, keep, request.prompt[keep:]
        request.chain = self.model.sampler(request.sampling)
        request.text = TextStream(self.model, request.sampling.stop, min(request.sampling.max_tokens or room, room))
        self._active[seq] = request

    def _swap_prompt(self, seq: int, prompt: list[int], keep: int) -> int:
        """``GgufModel._swap_prompt`` for one sequence: save its cells when the prompt would drop many of them, load
        the saved prompt sharing the most with ``prompt`` when that beats what the sequence holds."""
        from edgekit.runtime.llm import PROMPT_CACHE_MIN_TOKENS, SavedPrompt

        llama_cpp, ctx, cache = self._llama_cpp, self.model.llm.ctx, self._saved
        held = self._kv[seq]
        try:
            saved = cache[prompt]  # looked up before saving: a save may push it out of the cache
        except KeyError:
            saved = None
        if len(held) - keep >= PROMPT_CACHE_MIN_TOKENS:
            size = llama_cpp.llama_state_seq_get_size(ctx, seq)
            if size <= cache.capacity_bytes:
                buffer = (self.model._ctypes.c_uint8 * size)()
                cache[held] = SavedPrompt(list(held), buffer, llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq))
        if saved is None:
            return keep
        shared = common_prefix(saved.tokens, prompt)
        if shared <= keep + PROMPT_CACHE_MIN_TOKENS // 4:
            return keep
        if llama_cpp.llama_state_seq_set_data(ctx, saved.buffer, saved.llama_state_size, seq) == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            held.clear()
            return 0
        self._kv[seq] = list(saved.tokens)
        return shared

    def _release(self, request: _Request) -> None:
        self._active.pop(request.seq, None)
        request.chain.close()
        with self._cond:
            self._free.add(request.seq)

    def _finish(self, request: _Request) -> None:
        text = request.text
        if (tail := text.tail()) is not None:
            request.events.put(tail)
        elapsed = time.perf_counter() - request.started if request.started else 0.0
        self._release(request)
        request.events.put(Finish(text.reason or "stop", len(request.prompt), text.produced, request.cached, elapsed))

    def _step(self) -> None:
        """One llama_decode: the next token of every decoding stream, then prompt tokens up to PREFILL_CHUNK."""
        llama_cpp, batch = self._llama_cpp, self._batch
        outputs: list[tuple[int, _Request]] = []
        n, budget = 0, PREFILL_CHUNK

        def add(token: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, len(self._kv[seq]), 1, logits
            batch.seq_id[n][0] = seq
            self._kv[seq].append(token)
            if logits:
                outputs.append((n, self._active[seq]))
            n += 1

        for request in list(self._active.values()):
            if request.cancelled():
                request.text.reason = "cancelled"
                self._finish(request)
            elif request.next_token is not None:
                add(request.next_token, request.seq, True)
        for request in list(self._active.values()):
            if request.pending and budget > 0:
                take, request.pending = request.pending[:budget], request.pending[budget:]
                budget -= len(take)
                for i, token in enumerate(take):
                    add(token, request.seq, not request.pending and i == len(take) - 1)
        if not n:
            return
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self.model.llm.ctx, batch)
        if status != 0:
            raise RuntimeBackendError(f"llama_decode failed with status {status}")
        sample = llama_cpp.llama_sampler_sample
        for index, request in outputs:
            token = sample(request.chain.sampler, self.model.llm.ctx, index)
            if not request.started:
                request.started = time.perf_counter()
            delta, done = request.text.feed(token)
            if delta is not None:
                request.events.put(delta)
            if done:
                request.next_token = None
                self._finish(request)
            else:
                request.next_token = token
