"""Concurrent streams of one GGUF model decode as sequences of one llama.cpp context (edgekit.runtime.llm_batch)."""

from __future__ import annotations

import itertools
import queue
import threading

import pytest
from serve_fixtures import wait_until

from edgekit.runtime.llm import Delta, Finish, GgufModel, Sampling
from edgekit.runtime.llm_batch import BatchedGguf


@pytest.fixture(scope="module")
def gguf(sample_store):
    from serve_fixtures import smollm_gguf

    return smollm_gguf(sample_store)


@pytest.fixture(scope="module")
def engine(gguf):
    batched = BatchedGguf(GgufModel(gguf, n_ctx=512, threads=1), 4)
    yield batched
    batched.close()


def test_the_engine_context_runs_what_fit_charges(engine):
    """The llama.cpp context the engine decodes in has the micro-batch, attention kernel and output rows that
    `edgekit fit` charges its compute buffer for."""
    from edgekit.fit import FitSettings
    from edgekit.fit.memory import RunSettings
    from edgekit.runtime.llama_params import sequences_for

    llama_cpp, ctx = engine.model._llama_cpp, engine.model.llm.ctx
    params = engine.model.llm.context_params
    assert llama_cpp.llama_n_batch(ctx) == llama_cpp.llama_n_ubatch(ctx) == FitSettings().n_ubatch == 512
    assert params.flash_attn_type == (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if RunSettings(n_ctx=512).flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    assert params.n_outputs_max == engine.sequences == sequences_for(4) == 8
    assert llama_cpp.llama_n_seq_max(ctx) == 8


SYSTEMS = ("Alpha: you write short stories.", "Bravo: you write poems.", "Charlie: you write letters.",
           "Delta: you write recipes.")


def prompts(model: GgufModel, n: int) -> list[list[int]]:
    """Chat prompts that share only the first tokens of the system turn."""
    return [model.tokenize(model.render_chat([{"role": "system", "content": SYSTEMS[i]},
                                              {"role": "user", "content": "Something about a lighthouse keeper."}]), chat=True)
            for i in range(n)]


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def test_one_stream_at_a_time_equals_the_single_context_loop(engine, gguf):
    """Same batch shapes, same kernels, same cells: the first stream's text is the single-stream text, and a prompt
    reuses the sequence that holds its prefix. A second sequence's cells sit after the first one's in the shared pool,
    so attention sums in another order (float rounding, as in llama-server's unified cache): its first token agrees."""
    single = GgufModel(gguf, n_ctx=512, threads=1, prompt_cache_contexts=0)
    sampling = Sampling(max_tokens=16, temperature=0)
    first, second = prompts(engine.model, 2)
    assert text_of(engine.generate(first, sampling)) == text_of(single.generate(first, sampling))
    one = Sampling(max_tokens=1, temperature=0)
    assert text_of(engine.generate(second, one)) == text_of(single.generate(second, one))
    again = prompts(engine.model, 1)[0]
    finish = list(engine.generate(again, sampling))[-1]
    assert finish.cached_tokens == len(again) - 1  # parked in the RAM cache when the second one started, loaded back


def test_four_concurrent_streams_finish_with_their_limits(engine):
    results: dict[int, list] = {}
    limits = [8, 12, 16, 20]

    def run(i: int, prompt: list[int]) -> None:
        results[i] = list(engine.generate(prompt, Sampling(max_tokens=limits[i], temperature=0.7, seed=i)))

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(engine.model, 4))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, events in results.items():
        finish = events[-1]
        assert isinstance(finish, Finish) and all(isinstance(e, Delta) for e in events[:-1])
        assert finish.reason in ("length", "stop") and finish.completion_tokens <= limits[i]
        if finish.reason == "length":
            assert finish.completion_tokens == limits[i]
    assert sorted(results) == [0, 1, 2, 3]


def test_cancel_and_stop_strings_in_the_batched_loop(engine):
    prompt = prompts(engine.model, 1)[0]
    polls = itertools.count()  # the decode thread polls once per step: cancelled from the 5th step on
    events = list(engine.generate(prompt, Sampling(max_tokens=60, temperature=0), lambda: next(polls) >= 4))
    assert (events[-1].reason, events[-1].completion_tokens) == ("cancelled", 4)
    full = text_of(engine.generate(prompt, Sampling(max_tokens=16, temperature=0)))
    word = full.split()[3]
    stopped = list(engine.generate(prompt, Sampling(max_tokens=16, temperature=0, stop=(word,))))
    assert stopped[-1].reason == "stop" and text_of(stopped) == full[: full.index(word)]


def test_a_runner_with_slots_batches_its_gguf_streams(smollm_bundle):
    from edgekit.bundle import read_manifest
    from edgekit.serve.protocol import WorkerConfig
    from edgekit.serve.runners import GenerationRunner

    config = WorkerConfig(n_ctx=256, threads=1, slots=3, batch_max=1, batch_max_tokens=64, max_prompt_chars=10_000)
    runner = GenerationRunner(smollm_bundle, read_manifest(smollm_bundle), config)
    try:
        assert runner.slots == 3 and isinstance(runner.engine, BatchedGguf)
        assert runner.engine.model.llm.context_params.n_seq_max == 6  # an idle sequence per slot keeps a prompt
        assert runner.engine.pool == 256  # one pool of n_ctx cells for all sequences
    finally:
        runner.engine.close()


def test_saved_prompts_come_back_to_any_sequence(gguf):
    """With a saved-prompt RAM cache (--prompt-cache-contexts): another long conversation pushes the long system prompt
    out of the shared KV pool; it is saved to RAM on the way out and loaded back for its next turn, which decodes only
    the new part."""
    from edgekit.runtime.llm import PROMPT_CACHE_MIN_TOKENS

    engine = BatchedGguf(GgufModel(gguf, n_ctx=512, threads=1, prompt_cache_contexts=4), 4)
    model = engine.model
    story = "The ferry to the island ran only twice a day, and Mira missed the morning one by less than a minute. " * 12

    def chat(system: str, user: str) -> list[int]:
        return model.tokenize(model.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}]),
                              chat=True)

    try:
        first = chat(story, "Who is Mira?")
        assert len(first) > PROMPT_CACHE_MIN_TOKENS
        list(engine.generate(first, Sampling(max_tokens=2, temperature=0)))
        other = chat(SYSTEMS[0] * 40, "Go on.")
        assert len(first) + len(other) > engine.pool  # the pool cannot hold it next to the story
        list(engine.generate(other, Sampling(max_tokens=2, temperature=0)))
        assert all(common_prefix_len(tokens + [-1], first) < 10 for tokens in engine._kv)  # the story left the pool
        again = chat(story, "Where is the ferry?")
        finish = list(engine.generate(again, Sampling(max_tokens=2, temperature=0)))[-1]
        assert finish.cached_tokens == common_prefix_len(first, again)
    finally:
        engine.close()


def common_prefix_len(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def long_chat(model: GgufModel, system: str, user: str) -> list[int]:
    return model.tokenize(model.render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}]),
                          chat=True)


def test_a_starting_request_parks_idle_sequences_in_the_saved_prompt_cache(gguf):
    """With a RAM cache (the daemon's default), a starting request moves every idle sequence's cells there, long
    or short, so the pool holds only what is being generated; each prompt comes back from RAM for its next turn."""
    engine = BatchedGguf(GgufModel(gguf, n_ctx=2048, threads=1, prompt_cache_contexts=1), 2)
    try:
        model = engine.model
        story = "The ferry to the island ran only twice a day, and Mira missed the morning one by a minute. " * 10
        long_first = long_chat(model, story, "Who is Mira?")
        short_first = prompts(model, 1)[0]
        sampling = Sampling(max_tokens=2, temperature=0)
        list(engine.generate(long_first, sampling))
        list(engine.generate(short_first, sampling))
        # the long conversation left the pool when the short one started, which holds its prompt and its first token
        # (the last token sampled is never decoded)
        assert sorted(len(tokens) for tokens in engine._kv if tokens) == [len(short_first) + 1]
        again = long_chat(model, story, "Where is the ferry?")
        finish = list(engine.generate(again, sampling))[-1]
        assert finish.cached_tokens == common_prefix_len(long_first, again) > 200
        assert sorted(len(tokens) for tokens in engine._kv if tokens) == [len(again) + 1]
        finish = list(engine.generate(short_first, sampling))[-1]
        assert finish.cached_tokens == len(short_first) - 1  # short conversations are saved too
    finally:
        engine.close()


def test_an_idle_engine_saves_finished_conversations_before_the_next_request_comes(gguf):
    """With nothing to decode, the engine copies a finished conversation's cells to the RAM cache at once, so the next
    request's start only drops them (no copy on its way to the first token), and the conversation still comes back."""
    engine = BatchedGguf(GgufModel(gguf, n_ctx=2048, threads=1, prompt_cache_contexts=1), 2)
    try:
        model, cache = engine.model, engine._saved
        story = "The ferry to the island ran only twice a day, and Mira missed the morning one by a minute. " * 10
        sampling = Sampling(max_tokens=2, temperature=0)
        first = long_chat(model, story, "Who is Mira?")
        list(engine.generate(first, sampling))
        (seq, held), = [(seq, list(tokens)) for seq, tokens in enumerate(engine._kv) if tokens]
        # no request follows: only the idle engine can save it
        wait_until(lambda: tuple(held) in cache.cache_state, "the idle engine saved the finished conversation")
        copies = CopyLog(engine)
        list(engine.generate(prompts(model, 1)[0], sampling))
        assert seq not in [s for s, _ in copies.made] and not engine._kv[seq]  # dropped from the pool, not copied again
        again = long_chat(model, story, "Where is the ferry?")
        finish = list(engine.generate(again, sampling))[-1]
        assert finish.cached_tokens == common_prefix_len(first, again) > 200
    finally:
        engine.close()


def finish_of(events: queue.SimpleQueue) -> Finish:
    """The Finish that ``BatchedGguf.start``'s emit put on ``events``, after its deltas."""
    while not isinstance(event := events.get(timeout=120), Finish):
        if isinstance(event, BaseException):
            raise event
    return event


class CopyLog:
    """Wraps an engine's llama_cpp: each copy of a sequence's cells to RAM is logged as (sequence, whether a request
    was waiting); ``hold`` makes the first copy wait for ``release`` after setting ``entered``."""

    def __init__(self, engine: BatchedGguf, hold: bool = False) -> None:
        self.made: list[tuple[int, bool]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()
        llama_cpp = engine._llama_cpp
        log = self

        class Logged:
            def __getattr__(self, name):
                return getattr(llama_cpp, name)

            def llama_state_seq_get_data(self, ctx, buffer, size, seq_id):
                log.entered.set()
                log.release.wait()
                log.made.append((seq_id, bool(engine._waiting)))
                return llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id)

        engine._llama_cpp = Logged()


def test_an_arriving_request_stops_the_idle_copies(gguf):
    """The idle engine copies one sequence at a time and stops as soon as a request waits: the other idle sequence is
    copied by that request's start (when nothing waits any more), not before it."""
    engine = BatchedGguf(GgufModel(gguf, n_ctx=2048, threads=1, prompt_cache_contexts=1), 2)
    try:
        model = engine.model
        sampling = Sampling(max_tokens=2, temperature=0)
        copies = CopyLog(engine, hold=True)
        done = [queue.SimpleQueue() for _ in range(2)]
        for i, prompt in enumerate(prompts(model, 2)):  # both decode before the engine idles
            engine.start(prompt, sampling, lambda: False, done[i].put)
        for events in done:
            finish_of(events)
        assert copies.entered.wait(60)  # the idle engine is copying the first of the two
        third = queue.SimpleQueue()
        engine.start(prompts(model, 3)[2], sampling, lambda: False, third.put)
        wait_until(lambda: engine._waiting, "the third request waits")
        copies.release.set()
        finish_of(third)
        assert [waiting for _, waiting in copies.made] == [True, False]  # the second copy came after its assignment
        assert len({seq for seq, _ in copies.made}) == 2
    finally:
        engine.close()


def test_idle_sequences_are_the_prompt_cache(gguf):
    """No RAM cache: a long system prompt stays in the KV pool of its idle sequence while other requests come and
    go, and its next turn is routed there and decodes only the new part."""
    engine = BatchedGguf(GgufModel(gguf, n_ctx=1024, threads=1, prompt_cache_contexts=0), 2)
    try:
        model = engine.model
        story = "The ferry to the island ran only twice a day, and Mira missed the morning one by a minute. " * 10
        first = long_chat(model, story, "Who is Mira?")
        list(engine.generate(first, Sampling(max_tokens=2, temperature=0)))
        for system in SYSTEMS[:3]:
            list(engine.generate(long_chat(model, system, "Go on."), Sampling(max_tokens=2, temperature=0)))
        again = long_chat(model, story, "Where is the ferry?")
        finish = list(engine.generate(again, Sampling(max_tokens=2, temperature=0)))[-1]
        assert finish.cached_tokens == common_prefix_len(first, again) > 200
    finally:
        engine.close()


def test_streams_that_outgrow_the_shared_pool_end_with_length(gguf):
    """Four streams that together want more cells than the pool holds: idle cells are given up first, then the
    stream holding the most cells ends with "length"; every stream ends cleanly and the engine serves on."""
    engine = BatchedGguf(GgufModel(gguf, n_ctx=256, threads=1, prompt_cache_contexts=0), 4)
    try:
        results: dict[int, list] = {}

        def run(i: int, prompt: list[int]) -> None:
            # 4 x (prompt + 80 tokens) is far more than the 256 cells of the pool
            results[i] = list(engine.generate(prompt, Sampling(max_tokens=80, temperature=0.8, seed=i)))

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts(engine.model, 4))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert sorted(results) == [0, 1, 2, 3]
        finishes = [events[-1] for events in results.values()]
        assert all(isinstance(f, Finish) and f.reason in ("length", "stop") for f in finishes)
        assert sum(f.prompt_tokens + f.completion_tokens for f in finishes) > engine.pool or any(
            f.reason == "stop" for f in finishes)
        assert engine._cells() <= engine.pool
        after = list(engine.generate(prompts(engine.model, 1)[0], Sampling(max_tokens=4, temperature=0)))
        assert after[-1].reason in ("length", "stop")
    finally:
        engine.close()


def test_deltas_queued_while_the_consumer_is_busy_go_out_as_one(engine):
    """A consumer that falls behind gets the queued text in fewer, longer deltas; the text is the same."""
    from serve_fixtures import wait_until

    prompt = prompts(engine.model, 1)[0]
    sampling = Sampling(max_tokens=24, temperature=0)
    eager = [e for e in engine.generate(prompt, sampling) if isinstance(e, Delta)]
    slow = []
    for event in engine.generate(prompt, sampling):
        if isinstance(event, Delta):
            slow.append(event)
            if len(slow) == 1:  # fall behind until the decode thread has queued everything else
                wait_until(lambda: not engine._active and not engine._waiting, "the stream is decoded")
    assert len(slow) <= 2  # the first delta, then all the queued text as one
    assert "".join(e.text for e in slow) == "".join(e.text for e in eager)
    assert slow[-1].tokens == eager[-1].tokens


def test_the_daemon_at_its_defaults_batches_four_streams_of_one_model(smollm_bundle, tmp_path):
    """`edgekit serve` at its default settings: four concurrent streamed chats of one GGUF model all run in one worker's
    batched engine and each arrives whole (its deltas add up to its usage, one finish reason, [DONE])."""
    import json

    from fastapi.testclient import TestClient
    from serve_fixtures import link_bundles, wait_until

    from edgekit.serve.app import create_app
    from edgekit.serve.settings import ServeSettings

    models = link_bundles(tmp_path / "models", smollm_bundle)
    name = smollm_bundle.name
    settings = ServeSettings(models=models, threads=1, n_ctx=512, preload=[name], idle_unload_s=0)
    assert settings.slots == 4
    results: dict[int, tuple[int, str, int, bool]] = {}
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        wait_until(lambda: client.get("/health").status_code == 200, "the model is loaded", 120)

        def run(i: int) -> None:
            body = {"model": name, "messages": [{"role": "user", "content": f"Story {i}: a lighthouse keeper."}],
                    "max_tokens": 12, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                status = response.status_code
            events = [json.loads(line) for line in lines[:-1]]
            reasons = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
            usage = next(e["usage"] for e in events if e.get("usage"))
            results[i] = (status, reasons[0] if len(reasons) == 1 else str(reasons), usage["completion_tokens"],
                          lines[-1] == "[DONE]")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        health = client.get("/health").json()
    assert sorted(results) == [0, 1, 2, 3]
    for status, reason, tokens, done in results.values():
        assert status == 200 and done and reason in ("length", "stop") and 0 < tokens <= 12
        assert (reason == "length") == (tokens == 12)
    assert health["loaded"] == [name]


def test_a_step_never_carries_more_tokens_than_one_llama_decode_takes(gguf):
    """Three streams decoding while a long prompt is evaluated: each step's decode tokens and prompt slice together stay
    within n_batch (llama.cpp aborts the process past it). The four requests are queued before the decode thread
    takes any, so the steps that mix them always happen."""
    from edgekit.runtime.llama_params import PREFILL_CHUNK

    engine = BatchedGguf(GgufModel(gguf, n_ctx=2048, threads=1, prompt_cache_contexts=0), 4)
    try:
        model = engine.model
        story = "The ferry to the island ran only twice a day, and Mira missed the morning one by a minute. " * 50
        long_prompt = long_chat(model, story, "Who is Mira?")
        short = prompts(model, 3)
        # the first step takes the short prompts and the long one's first slice; the next has 3 decode tokens and
        # still a full slice of prompt to fit next to them
        assert len(long_prompt) - (PREFILL_CHUNK - sum(map(len, short))) >= PREFILL_CHUNK
        requests = [(p, 20) for p in short] + [(long_prompt, 4)]
        events = [queue.SimpleQueue() for _ in requests]
        with engine._cond:  # held: the decode thread takes none of them before all four are queued
            for (prompt, max_tokens), queued in zip(requests, events):
                engine.start(prompt, Sampling(max_tokens=max_tokens, temperature=0), lambda: False, queued.put)
        finishes = []
        for queued in events:
            while not isinstance(event := queued.get(timeout=300), Finish):
                assert isinstance(event, Delta), event
            finishes.append(event)
        assert [f.prompt_tokens for f in finishes] == [len(prompt) for prompt, _ in requests]
        assert all(f.reason in ("length", "stop") for f in finishes)
    finally:
        engine.close()
