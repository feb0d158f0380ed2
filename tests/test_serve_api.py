"""The API in-process (FastAPI TestClient + real worker subprocesses) on the real sample bundles.

One app serves SmolLM2 (GGUF), MiniLM (ONNX embeddings), two tiny classifiers, a bundle that
aborts llama.cpp, a bundle with a hostile chat template and bundles that fail verification, so
each case also shows the others keep serving. Outputs are compared with the runtime used
in-process (same file, same settings), not just checked for shape. Admission, queueing,
cancellation and lifecycle cases that need no real model run on the fake model in
test_serve_admission.py.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import (
    CRASH_NAME,
    MINILM_NAME,
    NER_NAME,
    SENTIMENT_NAME,
    SMOLLM_NAME,
    hostile_bundles,
    link_bundles,
    parse_metric,
    publish_gguf,
    wait_until,
)

from edgekit.schema.manifest import MANIFEST_NAME
from edgekit.serve.app import create_app
from edgekit.serve.settings import ServeSettings

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

BASE = "http://127.0.0.1:8080"
N_CTX = 96
THREADS = 1  # the CI machine is shared; one thread per worker keeps timings sane
ESCAPE_NAME = "smollm2-escape-template"
GOLDEN_NAME = "minilm-tampered-golden"
HOSTILE_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def settings_for(models: Path, **overrides) -> ServeSettings:
    values = {"models": models, "threads": THREADS, "n_ctx": N_CTX, "idle_unload_s": 0, "grace_s": 2.0,
              "restart_window_s": 60.0}
    return ServeSettings(**(values | overrides))


def wait_ready(client: TestClient, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"daemon not ready after {timeout} s: {response.json()}")


def model_states(client: TestClient) -> dict[str, str]:
    return {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}


def chat(client: TestClient, model: str = SMOLLM_NAME, **body):
    return client.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, "temperature": 0, **body})


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(client: TestClient, name: str, **labels) -> float:
    return parse_metric(client.get("/metrics").text, name, **labels)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, smollm_bundle, minilm_bundle, classifier_bundles, crash_bundle, fake_gguf) -> Path:
    root = tmp_path_factory.mktemp("api-models")
    models = link_bundles(root / "models", smollm_bundle, minilm_bundle, *classifier_bundles.values(), crash_bundle)
    publish_gguf(smollm_bundle / "model.gguf", models, ESCAPE_NAME, chat_template=HOSTILE_TEMPLATE)
    # the hostile GGUF bundles are made from the tiny GGUF: copied and hashed at every start in a few bytes, not 90 MB
    # (test_serve_bundles.py checks each one's reason on the SmolLM2 copies)
    tiny = publish_gguf(fake_gguf, root / "tiny", "tiny-gguf")
    hostile_bundles(models, tiny, minilm_bundle)
    tampered = models / GOLDEN_NAME  # MiniLM whose golden record holds another text's embedding for its first text
    shutil.copytree(minilm_bundle, tampered)
    manifest = json.loads((tampered / MANIFEST_NAME).read_text())
    texts = manifest["golden"]["texts"]
    texts[0]["output"] = texts[1]["output"]  # far below the cosine bound
    manifest["name"] = GOLDEN_NAME
    (tampered / MANIFEST_NAME).write_text(json.dumps(manifest))
    return models


def models_subset(models_dir: Path, target: Path, *names: str) -> Path:
    """A models directory holding only ``names`` of ``models_dir`` (hard links): a daemon started on it verifies those."""
    return link_bundles(target, *(models_dir / name for name in names))


@pytest.fixture(scope="module")
def client(models_dir: Path):
    # One slot: answers are compared token for token with the single-context reference (a second sequence of the
    # shared KV pool sums attention in another order, so its greedy text may differ in the last bits). The tampered
    # GGUF and the MiniLM copy with a tampered golden record are preloaded too: their workers refuse them.
    settings = settings_for(models_dir, preload=[SMOLLM_NAME, MINILM_NAME, "tampered-gguf", GOLDEN_NAME], slots=1)
    with TestClient(create_app(settings), base_url=BASE) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def reference_llm(smollm_bundle):
    """llama-cpp-python in this process with the worker's settings: what the daemon must reproduce."""
    from edgekit.runtime.llm import GgufModel

    return GgufModel(smollm_bundle / "model.gguf", n_ctx=N_CTX, threads=THREADS)


# ---- discovery: bad bundles skipped, the rest serve (docs/reliability.md case 1, 3, 5) -------------------


def test_bad_bundles_are_skipped_and_the_rest_serve(client):
    """Preloaded bundles are verified by their own worker (in parallel with discovery): the tampered one in the preload
    list is rejected like the ones discovery refuses, and the rest serve."""
    health = client.get("/health").json()
    assert health["rejected"] == ["absurd-gguf", "escape-onnx", "tampered-gguf", "truncated-gguf"]
    assert health["loaded"] == [MINILM_NAME, SMOLLM_NAME]
    assert sorted(model_states(client)) == sorted([SMOLLM_NAME, MINILM_NAME, SENTIMENT_NAME, NER_NAME, CRASH_NAME, ESCAPE_NAME,
                                                   GOLDEN_NAME])
    assert "tampered-gguf" not in model_states(client)
    response = chat(client, "tampered-gguf")
    error = response.json()["error"]
    assert response.status_code == 503 and error["code"] == "model_unavailable" and "sha256 differs" in error["message"]
    assert "outside the bundle" in client.post("/v1/embeddings", json={"model": "escape-onnx", "input": "x"}).json()["error"]["message"]
    assert chat(client, max_tokens=2).status_code == 200


# ---- generation ---------------------------------------------------------------------------------


def test_chat_matches_llama_cpp_in_process(client, reference_llm):
    """Greedy chat through the daemon = the same GGUF run in-process: same prompt tokens, same text."""
    from edgekit.runtime.llm import Delta, Sampling

    response = chat(client, max_tokens=10)
    assert response.status_code == 200
    body = response.json()
    prompt = reference_llm.tokenize(reference_llm.render_chat(QUESTION), chat=True)
    events = list(reference_llm.generate(prompt, Sampling(max_tokens=10, temperature=0)))
    expected = "".join(e.text for e in events if isinstance(e, Delta))
    assert len(prompt) == 37
    assert body["usage"] == {"prompt_tokens": 37, "completion_tokens": 10, "total_tokens": 47}
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["object"] == "chat.completion" and body["model"] == SMOLLM_NAME and body["id"].startswith("chatcmpl-")


def test_streamed_chat_equals_non_streamed(client):
    plain = chat(client, max_tokens=12).json()
    with client.stream("POST", "/v1/chat/completions", json={"model": SMOLLM_NAME, "messages": QUESTION, "temperature": 0,
                                                             "max_tokens": 12, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stop_sequences_and_max_tokens(client):
    full = chat(client, max_tokens=12).json()["choices"][0]["message"]["content"]
    stop = full.split(",")[1][:5]  # a piece from the middle of the greedy answer
    cut = chat(client, max_tokens=12, stop=[stop, "never-appears"]).json()
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    short = chat(client, max_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_reproducible(client):
    first = chat(client, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234).json()["choices"][0]["message"]["content"]
    second = chat(client, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234).json()["choices"][0]["message"]["content"]
    assert first == second and len(first) > 0


def test_text_completion(client):
    response = client.post("/v1/completions", json={"model": SMOLLM_NAME, "prompt": "The capital of France is",
                                                    "max_tokens": 4, "temperature": 0})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith(" Paris")
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    with client.stream("POST", "/v1/completions", json={"model": SMOLLM_NAME, "prompt": "The capital of France is",
                                                        "max_tokens": 4, "temperature": 0, "stream": True}) as streamed:
        events = sse_events(streamed)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]


def test_context_length_exceeded_and_length_at_context_end(client):
    """docs/reliability.md case 12: a prompt over the context -> 400 context_length_exceeded; running into the end -> 'length'."""
    long_prompt = [{"role": "user", "content": "word " * 200}]
    response = client.post("/v1/chat/completions", json={"model": SMOLLM_NAME, "messages": long_prompt})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"context window is {N_CTX} tokens" in error["message"]
    body = chat(client).json()  # no max_tokens: generate until the context is full
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 37, "completion_tokens": N_CTX - 37, "total_tokens": N_CTX}


def test_streamed_utf8_split_across_tokens(client, reference_llm):
    """docs/reliability.md case 20: emoji are 3 byte-level tokens in SmolLM2's vocab; every SSE chunk carries whole characters."""
    assert len(reference_llm.tokenize("🎉")) == 3
    prompt = "Emoji party: 🎉🎉🎉🎉🎉🎉🎉🎉 日本語 日本語 日本語 🎉🎉🎉"
    with client.stream("POST", "/v1/completions", json={"model": SMOLLM_NAME, "prompt": prompt, "max_tokens": 24,
                                                        "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as response:
        raw = response.read()
    raw.decode("utf-8")  # the whole stream is valid UTF-8
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    text = "".join(pieces)
    assert "\ufffd" not in text and any(ch in text for ch in "🎉日本語")
    multibyte = [p for p in pieces if any(ord(ch) > 0xFFFF or 0x3000 <= ord(ch) <= 0x9FFF for ch in p)]
    assert multibyte and all("\ufffd" not in p for p in multibyte)
    completion_tokens = events[-1]["usage"]["completion_tokens"]
    assert completion_tokens == 24 and len(pieces) < completion_tokens  # partial characters were held back, not sent


def test_two_concurrent_streams_both_complete_in_order(client):
    """docs/reliability.md case 23: with one slot the second stream waits; both arrive whole and in order."""
    expected = chat(client, max_tokens=16).json()["choices"][0]["message"]["content"]
    results: dict[int, tuple[str, str | None, bool]] = {}

    def run(index: int) -> None:
        with client.stream("POST", "/v1/chat/completions", json={"model": SMOLLM_NAME, "messages": QUESTION,
                                                                 "temperature": 0, "max_tokens": 16, "stream": True}) as r:
            events = sse_events(r)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        results[index] = (text, events[-2]["choices"][0]["finish_reason"], events[-1] == "[DONE]")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results == {0: (expected, "length", True), 1: (expected, "length", True)}


def test_llama_cpp_generation_stops_at_the_cancel_flag(reference_llm):
    """What the fake model stands in for in the cancellation tests: llama.cpp stops at the next token once cancelled."""
    from edgekit.runtime.llm import Delta, Finish, Sampling

    prompt = reference_llm.tokenize(reference_llm.render_chat(QUESTION), chat=True)
    deltas: list[Delta] = []
    events = reference_llm.generate(prompt, Sampling(max_tokens=40, temperature=0), lambda: len(deltas) >= 3)
    finish = None
    for event in events:
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            finish = event
    assert isinstance(finish, Finish) and (finish.reason, finish.prompt_tokens, finish.completion_tokens) == ("cancelled", 37, 3)
    assert [d.tokens for d in deltas] == [1, 2, 3]
    before_prefill = list(reference_llm.generate(prompt, Sampling(max_tokens=40, temperature=0), lambda: True))
    assert before_prefill == [Finish("cancelled", 37, 0)]


def test_golden_check_failure_keeps_a_model_from_serving(client, models_dir):
    """The worker reruns the bundle's golden record before it reports ready: a tampered record fails on the real model,
    so that model is not served (503 naming the check; /health lists it as failed); the intact bundle passes and serves."""
    texts = json.loads((models_dir / GOLDEN_NAME / MANIFEST_NAME).read_text())["golden"]["texts"]
    assert len(texts) == 3 and texts[0]["shape"] == [384] and texts[0]["output"] == texts[1]["output"]
    health = client.get("/health").json()
    assert MINILM_NAME in health["loaded"] and GOLDEN_NAME not in health["loaded"] + health["rejected"]
    reason = health["failed"][GOLDEN_NAME]
    assert reason.startswith(f"golden check failed for {GOLDEN_NAME}: text 1: cosine ") and reason.endswith("outside the bound")
    refused = client.post("/v1/embeddings", json={"model": GOLDEN_NAME, "input": "hello"})
    error = refused.json()["error"]
    assert refused.status_code == 503 and error["code"] == "model_unavailable" and reason in error["message"]
    assert client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "hello"}).status_code == 200


# ---- encoders -----------------------------------------------------------------------------------


def test_embeddings_match_the_encoder_in_process(client, minilm_bundle):
    import numpy as np

    from edgekit.bundle import read_manifest
    from edgekit.runtime.encoder import EncoderModel

    texts = ["hello world", "A second, longer sentence about small boards at the edge.", ""]
    response = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": texts})
    assert response.status_code == 200
    body = response.json()
    got = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    reference = EncoderModel(minilm_bundle, read_manifest(minilm_bundle).runtime, threads=1).embed(texts)
    assert got.shape == (3, 384) and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert np.abs(got - reference).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # [CLS] hello world [SEP] = 4, [CLS] [SEP] = 2 for ""
    assert body["usage"]["prompt_tokens"] == 4 + len(reference_tokens(minilm_bundle, texts[1])) + 2
    encoded = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "hello world", "encoding_format": "base64"})
    vector = struct.unpack("<384f", base64.b64decode(encoded.json()["data"][0]["embedding"]))
    assert np.abs(np.asarray(vector) - reference[0]).max() < 1e-4


def reference_tokens(bundle: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.no_padding()
    return tokenizer.encode(text).ids


def test_token_id_arrays_embed_like_their_text(client, minilm_bundle):
    """docs/reliability.md case 33: token-id arrays are accepted as embeddings input (as OpenAI does), alone or mixed
    with texts, and embed exactly as the text they encode; an id the model does not have is a 400 naming it."""
    import numpy as np

    texts = ["hello world", "A second, longer sentence about small boards at the edge."]
    ids = [reference_tokens(minilm_bundle, text) for text in texts]
    by_text = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": texts}).json()
    one = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": ids[0]}).json()
    mixed = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": [ids[1], texts[0]]}).json()
    want = np.asarray([d["embedding"] for d in by_text["data"]])
    assert np.abs(np.asarray(one["data"][0]["embedding"]) - want[0]).max() < 1e-5
    assert np.abs(np.asarray([d["embedding"] for d in mixed["data"]]) - want[::-1]).max() < 1e-5
    assert one["usage"]["prompt_tokens"] == len(ids[0]) == 4
    bad = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": [texts[0], [101, 30522, 102]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[1]" and "30522" in bad.json()["error"]["message"]


def test_embedding_edge_cases(client):
    """docs/reliability.md case 15: "" -> 200; [] -> 400; a text over the bundle's 256 tokens is truncated to 256 (documented)."""
    empty = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": ""})
    assert empty.status_code == 200 and len(empty.json()["data"][0]["embedding"]) == 384
    assert client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": []}).status_code == 400
    long = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "edge " * 1000})
    assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] == 256
    wrong = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "x", "dimensions": 128})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "dimensions"


def test_concurrent_embeddings_are_micro_batched(client):
    before = metric(client, "edgekit_requests_total", model=MINILM_NAME, endpoint="/v1/embeddings", status="200")
    # As many clients as the queue holds (16), so none can find it full however the requests interleave.
    texts = [f"sentence number {i} about batching" for i in range(ServeSettings.model_fields["queue_size"].default)]
    results: dict[int, list[float]] = {}

    def run(i: int) -> None:
        results[i] = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": texts[i]}).json()["data"][0]["embedding"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    together = client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": texts}).json()["data"]
    import numpy as np

    assert len(results) == len(texts) == 16
    assert max(np.abs(np.asarray(results[i]) - np.asarray(together[i]["embedding"])).max() for i in range(16)) < 1e-4
    after = metric(client, "edgekit_requests_total", model=MINILM_NAME, endpoint="/v1/embeddings", status="200")
    assert after - before == 17


def test_text_and_token_classification(client, classifier_bundles):
    import numpy as np

    from edgekit.bundle import read_manifest
    from edgekit.runtime.encoder import EncoderModel

    texts = ["a wonderful film", "terrible, boring and far too long"]
    body = client.post("/v1/classify", json={"model": SENTIMENT_NAME, "input": texts}).json()
    bundle = classifier_bundles["text-classification"]
    reference = EncoderModel(bundle, read_manifest(bundle).runtime, threads=1).classify(texts)
    for item, probs in zip(body["data"], reference):
        scores = {entry["label"]: entry["score"] for entry in item["labels"]}
        assert set(scores) == {"NEGATIVE", "POSITIVE"} and abs(sum(scores.values()) - 1) < 1e-5
        assert abs(scores["NEGATIVE"] - probs[0]) < 1e-4 and abs(scores["POSITIVE"] - probs[1]) < 1e-4
        assert item["label"] == ["NEGATIVE", "POSITIVE"][int(np.argmax(probs))]
    top = client.post("/v1/classify", json={"model": SENTIMENT_NAME, "input": "fine", "top_k": 1}).json()
    assert len(top["data"][0]["labels"]) == 1
    ner = client.post("/v1/classify", json={"model": NER_NAME, "input": "Paris is in France"}).json()
    entities = ner["data"][0]["entities"]
    assert [text["token"] for text in entities] == ["paris", "is", "in", "france"]
    assert [(e["start"], e["end"]) for e in entities] == [(0, 5), (6, 8), (9, 11), (12, 18)]
    assert all(e["label"] in ("O", "B-LOC", "I-LOC") and 0 < e["score"] <= 1 for e in entities)
    assert ner["usage"]["prompt_tokens"] == 6


def test_task_mismatch_is_400(client):
    assert client.post("/v1/embeddings", json={"model": SMOLLM_NAME, "input": "x"}).json()["error"]["code"] == "model_not_supported"
    response = chat(client, MINILM_NAME)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert client.post("/v1/classify", json={"model": MINILM_NAME, "input": "x"}).status_code == 400


# ---- faults -----------------------------------------------------------------------------------


def test_native_abort_in_a_worker_fails_only_its_request(client):
    """llama.cpp aborts (std::out_of_range) tokenizing with a mismatched vocab: 502 for that request, the daemon
    and the other models keep serving, the worker is restarted."""
    restarts = metric(client, "edgekit_worker_restarts_total", model=CRASH_NAME)
    response = chat(client, CRASH_NAME, max_tokens=4)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "worker_crashed" and "signal SIGABRT" in error["message"]
    assert client.get("/health").status_code in (200, 503)
    assert chat(client, max_tokens=2).status_code == 200
    assert client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "still here"}).status_code == 200
    wait_until(lambda: metric(client, "edgekit_worker_restarts_total", model=CRASH_NAME) == restarts + 1, "the crash is counted")
    wait_until(lambda: model_states(client)[CRASH_NAME] == "ready", "the worker is restarted")
    # restarted; its next request crashes it again, nothing else


def test_chat_template_escape_is_contained(client):
    """docs/reliability.md case 2: a template reaching for __class__.__mro__ fails in the sandbox; the model is refused, the daemon lives."""
    response = chat(client, ESCAPE_NAME, max_tokens=2)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_unavailable" and "sandbox forbids" in error["message"]
    assert chat(client, max_tokens=2).status_code == 200


# ---- lifecycle ------------------------------------------------------------------------------


def test_memory_budget_refuses_and_evicts_lru(models_dir, tmp_path):
    """docs/reliability.md case 21: too big for the budget -> 507 insufficient_memory; otherwise idle models are evicted LRU first."""
    from edgekit.bundle import read_manifest
    from edgekit.serve.budget import MIB, footprint_bytes

    models = models_subset(models_dir, tmp_path / "models", SENTIMENT_NAME, NER_NAME, MINILM_NAME, SMOLLM_NAME)
    probe = settings_for(models)
    sizes = {name: footprint_bytes(read_manifest(models / name), probe) for name in (SENTIMENT_NAME, NER_NAME, MINILM_NAME, SMOLLM_NAME)}
    budget_mb = max(sizes[SENTIMENT_NAME], sizes[NER_NAME]) // MIB + 1  # room for one tiny classifier at a time
    assert sizes[SENTIMENT_NAME] + sizes[NER_NAME] > budget_mb * MIB < min(sizes[MINILM_NAME], sizes[SMOLLM_NAME])
    with TestClient(create_app(settings_for(models, memory_budget_mb=budget_mb)), base_url=BASE) as c:
        wait_ready(c)
        refused = chat(c, max_tokens=2)
        assert refused.status_code == 507
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory" and f"the memory budget is {budget_mb} MiB" in error["message"]
        assert f"needs about {sizes[SMOLLM_NAME] // MIB} MiB" in error["message"]
        assert c.post("/v1/classify", json={"model": SENTIMENT_NAME, "input": "x"}).status_code == 200
        assert model_states(c)[SENTIMENT_NAME] == "ready"
        assert c.post("/v1/classify", json={"model": NER_NAME, "input": "x"}).status_code == 200
        assert (model_states(c)[SENTIMENT_NAME], model_states(c)[NER_NAME]) == ("available", "ready")  # evicted, not OOM


def test_lru_eviction_order(models_dir):
    """Three small models, room for two: loading the third unloads the least recently used one."""
    from edgekit.bundle import read_manifest
    from edgekit.serve.budget import MIB, footprint_bytes

    probe = settings_for(models_dir)
    sizes = sorted(footprint_bytes(read_manifest(models_dir / n), probe) for n in (SENTIMENT_NAME, NER_NAME))
    second = models_dir.parent / "lru"
    second.mkdir(exist_ok=True)
    shutil.copytree(models_dir / SENTIMENT_NAME, second / SENTIMENT_NAME, dirs_exist_ok=True)
    shutil.copytree(models_dir / NER_NAME, second / NER_NAME, dirs_exist_ok=True)
    clone = second / "tiny-sentiment-copy"
    shutil.copytree(models_dir / SENTIMENT_NAME, clone, dirs_exist_ok=True)
    manifest = json.loads((clone / "manifest.json").read_text())
    manifest["name"] = "tiny-sentiment-copy"
    (clone / "manifest.json").write_text(json.dumps(manifest))
    budget_mb = 2 * sizes[1] // MIB + 1  # any two of the three, not all three
    assert 3 * sizes[0] > budget_mb * MIB
    with TestClient(create_app(settings_for(second, memory_budget_mb=budget_mb)), base_url=BASE) as c:
        wait_ready(c)
        for name in (SENTIMENT_NAME, NER_NAME, SENTIMENT_NAME, "tiny-sentiment-copy"):
            assert c.post("/v1/classify", json={"model": name, "input": "x"}).status_code == 200
        assert model_states(c) == {SENTIMENT_NAME: "ready", NER_NAME: "available", "tiny-sentiment-copy": "ready"}


def test_metrics_after_traffic(client):
    chat(client, max_tokens=3)
    client.post("/v1/embeddings", json={"model": MINILM_NAME, "input": "metrics"})
    text = client.get("/metrics").text
    assert metric(client, "edgekit_requests_total", model=SMOLLM_NAME, endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(client, "edgekit_tokens_generated_total", model=SMOLLM_NAME) >= 3
    assert metric(client, "edgekit_generations_total", model=SMOLLM_NAME, finish_reason="length") >= 1
    assert metric(client, "edgekit_decode_tokens_per_second", model=SMOLLM_NAME) > 0
    assert metric(client, "edgekit_models_loaded") >= 2
    assert metric(client, "edgekit_resident_memory_bytes", process="daemon") > 10e6
    assert metric(client, "edgekit_resident_memory_bytes", process=SMOLLM_NAME) > 50e6
    assert 'edgekit_queue_depth{model="' + SMOLLM_NAME + '"} 0.0' in text
    assert f'edgekit_request_duration_seconds_bucket{{endpoint="/v1/embeddings",le="+Inf",model="{MINILM_NAME}"}}' in text
