"""Concurrent generations of one GGUF model decoded together: one llama.cpp context, one sequence per stream, one
llama_decode per step carrying the next token of every stream (and a slice of a new prompt).

Decoding is bound by streaming the weights through the cores once per step, so N tokens in one step cost little more
than one. The sequences share one KV pool of n_ctx cells (the memory `edgekit fit` charges). With a saved-prompt RAM
cache (the daemon's default), the idle sequences' cells are copied there once nothing has decoded for a moment, and
a starting request drops them from the pool and loads back the saved prompt sharing the longest prefix with its own;
without one, idle sequences keep their cells as the prompt cache and a request goes to the one sharing the longest
prefix. Either way only the rest of the prompt is decoded. Text, stop strings, limits and cancellation are the
single-stream rules (``TextStream``), applied by the decode thread between steps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import RuntimeBackendError
from edgekit.runtime.llama_params import PREFILL_CHUNK, sequences_for
from edgekit.runtime.llm import (
    PROMPT_CACHE_MIN_TOKENS,
    Delta,
    Finish,
    GgufModel,
    PromptTooLong,
    Sampling,
    SavedPrompt,
    TextStream,
    common_prefix,
)

# With a saved-prompt cache, how long the engine waits with nothing to decode before it copies the idle sequences
# there: a conversation's next turn sent within it continues in place, with no copy made.
IDLE_SAVE_AFTER_S = 0.1


@dataclass
class _Request:
    prompt: list[int]
    sampling: Sampling
    cancelled: Callable[[], bool]
    emit: Callable[[Delta | Finish | BaseException], None]  # called on the decode thread
    seq: int = -1
    pending: list[int] = field(default_factory=list)  # prompt tokens not decoded yet
    cached: int = 0
    next_token: int | None = None
    chain: Any = None
    text: TextStream | None = None
    started: float = 0.0


class BatchedGguf:
    """``slots`` generations at once in one llama.cpp context whose sequences share one unified KV pool of the model's
    n_ctx cells (llama-server's ``--kv-unified``): the memory does not grow with the slots, and any one stream may
    use the whole context.

    With the model's saved-prompt cache, idle sequences are parked there whenever a request starts (copied there
    already if the engine was idle since), so the pool holds only what is being generated (attention spans the pool
    up to its highest used cell). Without it, sequences that are not generating keep their cells as the prompt cache:
    there are more sequence ids than slots so that a conversation's prefix survives other requests until the pool
    needs its cells (least recently used first), and a request goes to the idle sequence sharing the longest prefix
    with its prompt.
    """

    def __init__(self, model: GgufModel, slots: int) -> None:
        import numpy as np
        from llama_cpp._internals import LlamaContext

        self.model, self.slots = model, slots
        self.sequences = sequences = sequences_for(slots)
        llama_cpp, llm = model._llama_cpp, model.llm
        self._llama_cpp = llama_cpp
        params = llm.context_params
        params.n_seq_max = sequences
        # A step asks for at most one output row per sequence; llama.cpp would otherwise reserve logits for every
        # token of a micro-batch (512 x n_vocab floats, 96 MiB on a 49k vocabulary). It must be >= n_seq_max.
        params.n_outputs_max = sequences
        params.kv_unified = True
        params.n_ctx = model.n_ctx  # one pool of n_ctx cells for every sequence: what fit and the budget charge
        llm._ctx.close()  # before the new one: the two KV caches are never resident together
        llm._ctx = LlamaContext(model=llm._model, params=params, verbose=False)
        llm.reset()
        self.pool = llama_cpp.llama_n_ctx(llm.ctx)  # cells llama.cpp allocated (n_ctx padded)
        self._saved, model.prompt_cache = model.prompt_cache, None  # saved prompts serve every sequence
        self._ctx = llm.ctx
        self._memory = llama_cpp.llama_get_memory(llm.ctx)
        self._batch = batch = llama_cpp.llama_batch_init(PREFILL_CHUNK + slots, 0, 1)
        # The batch's arrays, bound once: a ctypes field read builds a new pointer object, five per token a step.
        self._fields = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(model._vocab)
        self._as_array = np.ctypeslib.as_array
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

    def start(self, prompt: list[int], sampling: Sampling, cancelled: Callable[[], bool],
              emit: Callable[[Delta | Finish | BaseException], None]) -> None:
        """Queue a generation: ``emit`` gets its deltas, then its ``Finish`` or the exception that ended it, on the
        decode thread (a caller that sends them on needs no thread hand-off per token). ``emit`` must not block long:
        every stream waits for it."""
        model = self.model
        if not prompt:
            raise RuntimeBackendError("empty prompt")
        if len(prompt) >= model.n_ctx:
            raise PromptTooLong(len(prompt), model.n_ctx)
        request = _Request(list(prompt), sampling, cancelled, emit)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify()

    def generate(self, prompt: list[int], sampling: Sampling,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Delta | Finish]:
        """``GgufModel.generate`` for one of the concurrent streams."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        self.start(prompt, sampling, cancelled, events.put)
        while True:
            event = events.get()
            if isinstance(event, Delta):  # the consumer fell behind: what is queued goes out as one delta
                while True:
                    try:
                        more = events.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(more, Delta):
                        yield event
                        event = more
                        break
                    event = Delta(event.text + more.text, more.tokens)
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finish):
                return

    # ---- the decode thread -------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._closed or self._active or self._waiting)

    def _run(self) -> None:
        while True:
            with self._cond:  # a next turn sent at once continues its sequence in place: no copy made for it
                quiet = self._saved is not None and not self._cond.wait_for(self._busy, timeout=IDLE_SAVE_AFTER_S)
            if quiet:
                self._save_idle()
            with self._cond:
                self._cond.wait_for(self._busy)
                if self._closed:
                    return
                while self._waiting and len(self._active) < self.slots:
                    self._assign(self._waiting.pop(0))
            try:
                self._step()
            except RuntimeBackendError as exc:
                for request in list(self._active.values()):
                    self._empty(request.seq)  # this step's tokens are in _kv, maybe not in the cells
                    self._release(request)
                    request.emit(exc)

    def _assign(self, request: _Request) -> None:
        """The idle sequence sharing the longest prefix with the prompt when that prefix is at least half of the prompt
        or of what the sequence holds; else an empty one; else the least recently used one (its cells are dropped)."""
        llama_cpp = self._llama_cpp
        idle = sorted(self._free)
        best = max(idle, key=lambda s: common_prefix(self._kv[s], request.prompt))
        shared = common_prefix(self._kv[best], request.prompt)
        if shared and 2 * shared >= min(len(request.prompt), len(self._kv[best])):
            seq = best
        else:
            seq = min(idle, key=lambda s: (len(self._kv[s]) > 0, self._used[s]))
        self._free.discard(seq)
        self._uses += 1
        self._used[seq] = self._uses
        keep = common_prefix(self._kv[seq], request.prompt)
        if self._saved is not None:
            self._park_idle()  # first, so that the cells this request adds go to the bottom of the emptied pool
            keep = self._swap_prompt(seq, request.prompt, keep)
        keep = min(keep, len(request.prompt) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            keep = 0
        del self._kv[seq][keep:]
        room = self.model.n_ctx - len(request.prompt)
        request.seq, request.cached, request.pending = seq, keep, request.prompt[keep:]
        request.chain = self.model.sampler(request.sampling)
        request.text = TextStream(self.model, request.sampling.stop, min(request.sampling.max_tokens or room, room),
                                  request.sampling.control_text)
        self._active[seq] = request

    def _swap_prompt(self, seq: int, prompt: list[int], keep: int) -> int:
        """``GgufModel._swap_prompt`` for one sequence: save its cells when the prompt would drop many of them, load
        the saved prompt sharing the most with ``prompt`` when that beats what the sequence holds."""
        llama_cpp, ctx, cache = self._llama_cpp, self.model.llm.ctx, self._saved
        try:
            saved = cache[prompt]  # looked up before saving: a save may push it out of the cache
        except KeyError:
            saved = None
        self._save(seq, keep)
        if saved is None:
            return keep
        shared = common_prefix(saved.tokens, prompt)
        if shared <= keep:  # loading ~1,000 cells takes ~2 ms, far less than decoding even a few prompt tokens
            return keep
        self._empty(seq)
        self._drop_idle(len(saved.tokens))  # the saved cells need room in the pool
        if llama_cpp.llama_state_seq_set_data(ctx, saved.buffer, saved.llama_state_size, seq) == 0:
            self._empty(seq)
            return 0
        self._kv[seq] = list(saved.tokens)
        return shared

    def _save(self, seq: int, keep: int, least: int = PROMPT_CACHE_MIN_TOKENS) -> None:
        """Copy a sequence's cells to the saved-prompt cache (if there is one) when ``keep`` would drop at least
        ``least`` of them and the cache does not hold them already."""
        llama_cpp, ctx, cache, held = self._llama_cpp, self.model.llm.ctx, self._saved, self._kv[seq]
        if cache is None or not held or len(held) - keep < least:
            return
        if (key := tuple(held)) in cache.cache_state:  # saved while the engine was idle
            cache.cache_state.move_to_end(key)
            return
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        if size > cache.capacity_bytes:
            return
        buffer = (self.model._ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq) != size:
            return  # a partial copy would pass for this conversation's cells
        for shorter in [k for k in cache.cache_state if len(k) < len(key) and key[:len(k)] == k]:
            del cache.cache_state[shorter]  # every lookup it answered, the longer copy answers as well (turns of one chat)
        cache[held] = SavedPrompt(list(held), buffer, size)

    def _save_idle(self) -> None:
        """Nothing has decoded for IDLE_SAVE_AFTER_S: copy the idle sequences' cells to the saved-prompt cache now, so
        that the next request only drops them (``_park_idle``); copying the cells of a 1,000-token prompt of
        SmolLM2-135M took 17 ms of the next request's first token. A request that arrives meanwhile, its own
        conversation's next turn included, waits for one sequence's copy at most."""
        for seq in sorted(self._free, key=lambda s: self._used[s]):  # oldest first: the latest ends most recently used
            if self._waiting or self._closed:
                return
            self._save(seq, 0, least=1)

    def _park_idle(self) -> None:
        """Move the cells of every idle sequence to the saved-prompt cache (llama-server's --cache-idle-slots).

        Attention spans the pool up to its highest used cell, so idle cells kept as an in-pool prompt cache slow every
        decoding stream (on SmolLM2-135M, 2,500 idle cells cost one stream 15 % of its tokens/s). Short conversations
        are saved too: wherever their cells sit, they would hold the span up."""
        for seq in self._free:
            if self._kv[seq]:
                self._save(seq, 0, least=1)
                self._empty(seq)

    def _cells(self) -> int:
        return sum(len(tokens) for tokens in self._kv)

    def _drop_idle(self, need: int) -> None:
        """Free the cells of idle sequences, least recently used first, until ``need`` more cells fit in the pool."""
        for seq in sorted(self._free, key=lambda s: self._used[s]):
            if self._cells() + need <= self.pool:
                return
            if self._kv[seq]:
                self._save(seq, 0)
                self._empty(seq)

    def _empty(self, seq: int) -> None:
        self._llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._kv[seq].clear()

    def _release(self, request: _Request) -> None:
        self._active.pop(request.seq, None)
        request.chain.close()
        with self._cond:
            self._free.add(request.seq)

    def _finish(self, request: _Request) -> None:
        text = request.text
        if (tail := text.tail()) is not None:
            request.emit(tail)
        elapsed = time.perf_counter() - request.started if request.started else 0.0
        self._release(request)
        request.emit(Finish(text.reason or "stop", len(request.prompt), text.produced, request.cached, elapsed))

    def _make_room(self) -> int:
        """Cells for this step: the next token of every decoding stream first (idle sequences give up their cells;
        when the generating ones alone fill the pool, the one holding the most cells ends with "length", as a lone
        stream does at the end of its context). Returns the cells left for prompt tokens."""
        while True:
            decoding = [r for r in self._active.values() if r.next_token is not None]
            prompt = min(PREFILL_CHUNK, sum(len(r.pending) for r in self._active.values()))
            need = len(decoding) or min(prompt, 1)
            self._drop_idle(len(decoding) + prompt)
            left = self.pool - self._cells()
            if left >= need or not self._active:
                return max(0, left - len(decoding))
            fullest = max(self._active.values(), key=lambda r: len(self._kv[r.seq]))
            fullest.text.reason = "length"
            self._finish(fullest)

    def _step(self) -> None:
        """One llama_decode: the next token of every decoding stream, then prompt tokens (oldest request first) up to
        PREFILL_CHUNK tokens in all."""
        llama_cpp, batch, ctx = self._llama_cpp, self._batch, self._ctx
        tokens, positions, n_seq_ids, seq_ids, wants_logits = self._fields
        outputs: list[tuple[int, _Request]] = []
        n = 0

        def add(token: int, seq: int, logits: bool) -> None:
            nonlocal n
            tokens[n], positions[n], n_seq_ids[n], wants_logits[n] = token, len(self._kv[seq]), 1, logits
            seq_ids[n][0] = seq
            self._kv[seq].append(token)
            if logits:
                outputs.append((n, self._active[seq]))
            n += 1

        for request in list(self._active.values()):
            if request.cancelled():
                request.text.reason = "cancelled"
                self._finish(request)
        room = self._make_room()
        for request in list(self._active.values()):
            if request.next_token is not None:
                add(request.next_token, request.seq, True)
        budget = min(PREFILL_CHUNK - n, room)  # one llama_decode takes at most n_batch (PREFILL_CHUNK) tokens
        for request in list(self._active.values()):
            if request.pending and budget > 0:
                take, request.pending = request.pending[:budget], request.pending[budget:]
                budget -= len(take)
                for i, token in enumerate(take):
                    add(token, request.seq, not request.pending and i == len(take) - 1)
        if not n:
            return
        batch.n_tokens = n
        status = llama_cpp.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeBackendError(f"llama_decode failed with status {status}")
        # Every output's logits in one view, in batch order (one numpy view per step, not one per stream: ~40 us each).
        rows = self._as_array(llama_cpp.llama_get_logits(ctx), shape=(len(outputs), self._n_vocab)) if outputs else ()
        for row, (index, request) in zip(rows, outputs):
            token = request.chain.sample(ctx, index, row)
            if not request.started:
                request.started = time.perf_counter()
            delta, done = request.text.feed(token)
            if delta is not None:
                request.emit(delta)
            if done:
                request.next_token = None
                self._finish(request)
            else:
                request.next_token = token
