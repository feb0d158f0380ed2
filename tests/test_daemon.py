"""The daemon as a real process: `edgekit serve` on 127.0.0.1, driven by the official openai client and plain HTTP.

Covers what only a real server shows: the openai client's view (chat streamed and not,
embeddings, errors), the front door over a real socket and a short mixed soak (24; the longer one
is in scripts/bench_serve.py). Client disconnects (17) and SIGTERM during generation (22) run on
the fake model in test_serve_admission.py, where the generation waits for the test instead of racing it.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from serve_fixtures import HTTP, MINILM_NAME, SENTIMENT_NAME, SMOLLM_NAME, Daemon, link_bundles

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

KEY = "daemon-test-key-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_bundle, minilm_bundle, classifier_bundles) -> Path:
    root = tmp_path_factory.mktemp("daemon")
    return link_bundles(root / "models", smollm_bundle, minilm_bundle, classifier_bundles["text-classification"])


@pytest.fixture(scope="module")
def daemon(models: Path):
    key_file = models.parent / "api-key"
    key_file.write_text(KEY + "\n")
    server = Daemon(models, "--preload", SMOLLM_NAME, "--preload", MINILM_NAME, "--preload", SENTIMENT_NAME, key_file=key_file,
                    key=KEY)
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def openai_client(daemon):
    import openai

    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_chat_streamed_and_not(openai_client):
    result = openai_client.chat.completions.create(model=SMOLLM_NAME, messages=QUESTION, max_tokens=12, temperature=0)
    text = result.choices[0].message.content
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (37, 12, 49)
    stream = openai_client.chat.completions.create(model=SMOLLM_NAME, messages=QUESTION, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    completion = openai_client.completions.create(model=SMOLLM_NAME, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert completion.choices[0].text.startswith(" Paris")


def test_openai_client_embeddings_and_models(openai_client, minilm_bundle):
    import numpy as np

    from edgekit.bundle import read_manifest
    from edgekit.runtime.encoder import EncoderModel

    texts = ["offline inference on a Raspberry Pi", "the weather is nice today"]
    result = openai_client.embeddings.create(model=MINILM_NAME, input=texts)
    got = np.asarray([d.embedding for d in result.data])
    reference = EncoderModel(minilm_bundle, read_manifest(minilm_bundle).runtime, threads=1).embed(texts)
    assert got.shape == (2, 384) and np.abs(got - reference).max() < 1e-4
    # the openai client asks for base64 by default when numpy is around; both paths decode to the same floats
    as_floats = openai_client.embeddings.create(model=MINILM_NAME, input=texts, encoding_format="float")
    assert np.abs(np.asarray([d.embedding for d in as_floats.data]) - reference).max() < 1e-4
    assert {m.id for m in openai_client.models.list()} == {SMOLLM_NAME, MINILM_NAME, SENTIMENT_NAME}


def test_openai_client_errors(openai_client, daemon):
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model=SMOLLM_NAME, messages=QUESTION, temperature=1e6)
    assert bad.value.body["param"] == "temperature"
    wrong = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_plain_http(daemon):
    """docs/reliability.md case 7, 8, 13 over a real socket."""
    assert HTTP.get(f"{daemon.url}/health").status_code == 200  # open without a key
    assert HTTP.get(f"{daemon.url}/v1/models").status_code == 401
    assert HTTP.get(f"{daemon.url}/v1/models", headers={**daemon.headers, "host": "evil.example"}).status_code == 403
    big = HTTP.post(f"{daemon.url}/v1/embeddings", headers=daemon.headers, content=b"x" * (10 * 1024 * 1024))
    assert big.status_code == 413
    metrics = HTTP.get(f"{daemon.url}/metrics", headers=daemon.headers)
    assert metrics.status_code == 200 and "edgekit_models_loaded 3.0" in metrics.text
    with pytest.raises(httpx.ConnectError):  # loopback only
        HTTP.get(f"http://{_non_loopback_address()}:{daemon.port}/health", timeout=2)


def _non_loopback_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # no packet is sent for a UDP connect
            address = sock.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address")
    return address


def test_short_soak_mixed_clients(daemon):
    """docs/reliability.md case 24 (short): 8 clients x 16 requests, chat/embeddings/classify mixed: 0 errors, RSS growth < 5 %.

    Latency stability is the benchmark's to measure (scripts/bench_serve.py); a test only counts.
    """
    import psutil

    warm = HTTP.post(f"{daemon.url}/v1/embeddings", headers=daemon.headers, json={"model": MINILM_NAME, "input": "warm"})
    assert warm.status_code == 200
    daemon_proc = psutil.Process(daemon.proc.pid)
    rss_start = daemon_proc.memory_info().rss
    errors: list[str] = []
    statuses: list[int] = []
    requests = [
        ("/v1/chat/completions", {"model": SMOLLM_NAME, "messages": QUESTION, "max_tokens": 6}),
        ("/v1/embeddings", {"model": MINILM_NAME, "input": ["soak test sentence", "another one"]}),
        ("/v1/classify", {"model": SENTIMENT_NAME, "input": ["good", "bad"]}),
        ("/v1/embeddings", {"model": MINILM_NAME, "input": "single"}),
    ]

    def client(index: int) -> None:
        with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=120) as http:
            for turn in range(index, index + 16):
                path, body = requests[turn % len(requests)]
                response = http.post(path, json=body)
                statuses.append(response.status_code)
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    rss_end = daemon_proc.memory_info().rss
    assert errors == []
    assert statuses == [200] * 128
    assert rss_end < 1.05 * rss_start, (rss_start, rss_end)
