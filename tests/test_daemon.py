"""The daemon as a real process: `edgekit serve` on 127.0.0.1, driven by the official openai client and plain HTTP.

Covers what only a real server shows: the openai client's view (chat streamed and not,
embeddings, errors), client disconnects cancelling generations (docs/reliability.md case 17), SIGTERM during
generation (22) and a short mixed soak (24; the longer one is in scripts/bench_serve.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve_bundles import (  # noqa: F401  (fixtures)
    MINILM_NAME,
    SENTIMENT_NAME,
    SMOLLM_NAME,
    bundle_cache,
    classifier_bundles,
    link_bundles,
    minilm_bundle,
    smollm_bundle,
)

pytestmark = pytest.mark.slow

KEY = "daemon-test-key-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# For cancellation tests: an answer that cannot end on its own before the client goes away, even on a
# fast idle machine (the capital-of-France answer ends in ~10 tokens, under 0.2 s at 65 tok/s).
STORY = [{"role": "user", "content": "Write a long story, at least 600 words, about a lighthouse keeper."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """`python -m edgekit serve` in a subprocess; its log goes to a file next to the models."""

    def __init__(self, models: Path, *args: str, key_file: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = models.parent / f"daemon-{self.port}.log"
        command = [sys.executable, "-m", "edgekit", "serve", "--models", str(models), "--port", str(self.port),
                   "--threads", "1", "--n-ctx", "256", "--idle-unload-s", "0", *args]
        if key_file is not None:
            command += ["--api-key-file", str(key_file)]
        self.headers = {"authorization": f"Bearer {KEY}"} if key_file else {}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 240.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready:\n{self.log.read_text()[-3000:]}")

    def metric(self, name: str, **labels) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_bundle, minilm_bundle, classifier_bundles) -> Path:
    root = tmp_path_factory.mktemp("daemon")
    return link_bundles(root / "models", smollm_bundle, minilm_bundle, classifier_bundles["text-classification"])


@pytest.fixture(scope="module")
def daemon(models: Path):
    key_file = models.parent / "api-key"
    key_file.write_text(KEY + "\n")
    server = Daemon(models, "--preload", SMOLLM_NAME, "--preload", MINILM_NAME, "--preload", SENTIMENT_NAME, key_file=key_file)
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
    """docs/reliability.md cases 7, 8, 13 over a real socket."""
    assert httpx.get(f"{daemon.url}/health").status_code == 200  # open without a key
    assert httpx.get(f"{daemon.url}/v1/models").status_code == 401
    assert httpx.get(f"{daemon.url}/v1/models", headers={**daemon.headers, "host": "evil.example"}).status_code == 403
    big = httpx.post(f"{daemon.url}/v1/embeddings", headers=daemon.headers, content=b"x" * (10 * 1024 * 1024))
    assert big.status_code == 413
    metrics = httpx.get(f"{daemon.url}/metrics", headers=daemon.headers)
    assert metrics.status_code == 200 and "edgekit_models_loaded 3.0" in metrics.text
    with pytest.raises(httpx.ConnectError):  # loopback only
        httpx.get(f"http://{_non_loopback_address()}:{daemon.port}/health", timeout=2)


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


def _wait_for(condition, timeout: float = 60.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_disconnect_cancels_streamed_generation(daemon):
    """docs/reliability.md case 17 (streamed): closing the connection stops the generation; the slot serves the next request."""
    cancelled = daemon.metric("edgekit_generations_total", model=SMOLLM_NAME, finish_reason="cancelled")
    tokens = daemon.metric("edgekit_tokens_generated_total", model=SMOLLM_NAME)
    received = 0
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{daemon.url}/v1/chat/completions", headers=daemon.headers,
                           json={"model": SMOLLM_NAME, "messages": STORY, "max_tokens": 1000, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    received += 1
                    if received == 3:
                        break
    _wait_for(lambda: daemon.metric("edgekit_generations_total", model=SMOLLM_NAME, finish_reason="cancelled") == cancelled + 1)
    generated = daemon.metric("edgekit_tokens_generated_total", model=SMOLLM_NAME) - tokens
    assert 3 <= generated <= 3 + 10, generated  # stopped within a few tokens of the disconnect, far from 1000
    after = httpx.post(f"{daemon.url}/v1/chat/completions", headers=daemon.headers, timeout=120,
                       json={"model": SMOLLM_NAME, "messages": QUESTION, "max_tokens": 2, "temperature": 0})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def test_disconnect_cancels_non_streamed_generation(daemon):
    """docs/reliability.md case 17 (non-streamed): the client gives up before any byte of the answer; the generation stops."""
    cancelled = daemon.metric("edgekit_generations_total", model=SMOLLM_NAME, finish_reason="cancelled")
    tokens = daemon.metric("edgekit_tokens_generated_total", model=SMOLLM_NAME)
    body = json.dumps({"model": SMOLLM_NAME, "messages": STORY, "max_tokens": 1000}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(request)
        _wait_for(lambda: daemon.metric("edgekit_active_requests", model=SMOLLM_NAME) == 1)
        _wait_for(lambda: daemon.metric("edgekit_queue_depth", model=SMOLLM_NAME) == 0)
        time.sleep(0.5)  # a few tokens into the generation
    _wait_for(lambda: daemon.metric("edgekit_generations_total", model=SMOLLM_NAME, finish_reason="cancelled") == cancelled + 1)
    generated = daemon.metric("edgekit_tokens_generated_total", model=SMOLLM_NAME) - tokens
    # 0.5 s plus the time to notice the disconnect: tens of tokens, far from a whole story.
    assert 1 <= generated <= 150, generated


def test_short_soak_mixed_clients(daemon):
    """docs/reliability.md case 24 (short): 8 mixed chat/embeddings/classify clients, ~20 s: 0 errors, RSS +<5 %, p95 stable."""
    import psutil

    warm = httpx.post(f"{daemon.url}/v1/embeddings", headers=daemon.headers, json={"model": MINILM_NAME, "input": "warm"})
    assert warm.status_code == 200
    daemon_proc = psutil.Process(daemon.proc.pid)
    rss_start = daemon_proc.memory_info().rss
    errors: list[str] = []
    latencies: list[tuple[float, float]] = []  # (finished at, seconds)
    stop_at = time.monotonic() + 20.0
    requests = [
        ("/v1/chat/completions", {"model": SMOLLM_NAME, "messages": QUESTION, "max_tokens": 6}),
        ("/v1/embeddings", {"model": MINILM_NAME, "input": ["soak test sentence", "another one"]}),
        ("/v1/classify", {"model": SENTIMENT_NAME, "input": ["good", "bad"]}),
        ("/v1/embeddings", {"model": MINILM_NAME, "input": "single"}),
    ]

    def client(index: int) -> None:
        with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=120) as http:
            turn = index
            while time.monotonic() < stop_at:
                path, body = requests[turn % len(requests)]
                turn += 1
                started = time.monotonic()
                response = http.post(path, json=body)
                if response.status_code != 200:
                    errors.append(f"{path}: {response.status_code} {response.text[:200]}")
                latencies.append((time.monotonic(), time.monotonic() - started))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    rss_end = daemon_proc.memory_info().rss
    assert errors == []
    assert len(latencies) >= 40
    latencies.sort()
    half = len(latencies) // 2
    first, second = sorted(s for _, s in latencies[:half]), sorted(s for _, s in latencies[half:])
    p95 = [values[int(0.95 * (len(values) - 1))] for values in (first, second)]
    assert p95[1] <= 2.0 * p95[0] + 0.5, p95
    assert rss_end < 1.05 * rss_start, (rss_start, rss_end)


def test_sigterm_finishes_in_flight_work_and_exits_0(models: Path):
    """docs/reliability.md case 22: SIGTERM during a generation: no new connections, the stream finishes, exit code 0."""
    server = Daemon(models, "--preload", SMOLLM_NAME, "--grace-s", "30")
    try:
        server.wait_ready()
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                              json={"model": SMOLLM_NAME, "messages": QUESTION, "max_tokens": 24, "temperature": 0,
                                    "stream": True}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _refused(server.url), timeout=30)
        reader.join(120)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    usage_free = [json.loads(e) for e in events[:-1]]
    assert all(e["choices"] for e in usage_free) and usage_free[0]["choices"][0]["delta"]["role"] == "assistant"


def test_sigterm_cancels_what_outlasts_the_grace_period(models: Path):
    """docs/reliability.md case 22: a generation longer than --grace-s is cancelled when the grace period ends; exit 0."""
    server = Daemon(models, "--preload", SMOLLM_NAME, "--grace-s", "0.5")
    events: list[str] = []
    try:
        server.wait_ready()
        started = threading.Event()

        def stream() -> None:
            try:
                with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                                  json={"model": SMOLLM_NAME, "messages": STORY, "max_tokens": 1000, "stream": True}) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            started.set()
            except httpx.HTTPError:
                events.append("<cut>")

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(120)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
        exited_after = time.monotonic() - signalled
        reader.join(60)
    finally:
        server.stop()
    # Cut short: a long story takes far longer than the 0.5 s grace period even at 100+ tok/s.
    assert "[DONE]" not in events
    assert exited_after < 0.5 + 15, exited_after  # grace period + worker shutdown, not the whole generation


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.TransportError:
        return True
    return False
