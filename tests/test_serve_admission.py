"""Admission, queueing, cancellation, crashes and lifecycle on the fake model: the real daemon, workers and protocol.

Workers load the ``fake_runner`` plugin (see tests/fake_runner.py), which serves gguf bundles with a
deterministic fake model that waits at gates the test opens. Every step waits for state the daemon
or the fake reports (a gate reached, a queue depth in /metrics), never for time to pass, so the
outcome is the same on an idle and on a loaded machine. The same properties with llama.cpp are in
test_serve_api.py and test_daemon.py (marked real_model).
"""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import (
    BASE,
    FAKE,
    FAKE_PLUGIN,
    HTTP,
    OTHER,
    Background,
    Daemon,
    Gates,
    chat,
    completion,
    fake_settings,
    parse_metric,
    refused,
    states,
    wait_until,
)

from edgekit.serve.app import create_app


def metric(client: TestClient, name: str, **labels) -> float:
    return parse_metric(client.get("/metrics").text, name, **labels)


def wait_ready(client: TestClient) -> dict:
    wait_until(lambda: client.get("/health").status_code == 200, "/health is 200")
    return client.get("/health").json()


@pytest.fixture
def app_client(fake_models: Path, gates: Gates):
    def make(**overrides) -> TestClient:
        return TestClient(create_app(fake_settings(fake_models, **overrides)), base_url=BASE)
    return make


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory, fake_gguf):
    """One app for the admission cases that leave nothing behind: 1 slot + a queue of 1, the fake model preloaded, and
    its gates (each case uses gates of its own name)."""
    from serve_fixtures import FAKE_NAMES, publish_gguf

    root = tmp_path_factory.mktemp("one-slot")
    models = root / "models"
    for name in FAKE_NAMES:
        publish_gguf(fake_gguf, models, name)
    gates = Gates(root / "gates")
    gates.root.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # the workers started by this app inherit the gates' environment
        for key, value in gates.env().items():
            patch.setenv(key, value)
        with TestClient(create_app(fake_settings(models, preload=[FAKE], queue_size=1, slots=1)), base_url=BASE) as c:
            wait_ready(c)
            yield c, gates


# ---- admission -------------------------------------------------------------------------------------------


def test_queue_full_gives_503_with_retry_after(one_slot):
    """docs/reliability.md case 18: 1 slot + queue of 1: the first holds the slot, the second waits, the third and fourth get 503."""
    c, gates = one_slot
    first = Background(lambda: chat(c, "hold:g1", max_tokens=40))
    wait_until(lambda: gates.reached("g1"), "the first request is generating")
    second = Background(lambda: chat(c, "second", max_tokens=40))
    wait_until(lambda: metric(c, "edgekit_queue_depth", model=FAKE) == 1, "the second request is queued")
    rejected = [chat(c, "third", max_tokens=40), chat(c, "fourth", max_tokens=40)]
    gates.open("g1")
    finished = [first.result(), second.result()]
    assert [r.status_code for r in rejected] == [503, 503]
    assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "queue_full" for r in rejected)
    assert [r.status_code for r in finished] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in finished] == [completion(40)] * 2
    assert [r.json()["usage"] for r in finished] == [{"prompt_tokens": 2, "completion_tokens": 40, "total_tokens": 42}] * 2


def test_second_stream_waits_for_the_slot_then_both_complete(one_slot):
    """docs/reliability.md case 23 (admission): with one slot the second stream is queued, not interleaved; both arrive whole."""
    def stream(text: str) -> tuple[str, str | None, bool]:
        with c.stream("POST", "/v1/chat/completions", json={"model": FAKE, "messages": [{"role": "user", "content": text}],
                                                           "max_tokens": 16, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"], events[-1] == "[DONE]"

    c, gates = one_slot
    first = Background(lambda: stream("hold:s1@4"))
    wait_until(lambda: gates.reached("s1"), "the first stream has 4 tokens")
    second = Background(lambda: stream("hold:s2"))
    wait_until(lambda: metric(c, "edgekit_queue_depth", model=FAKE) == 1, "the second stream is queued")
    assert metric(c, "edgekit_active_requests", model=FAKE) == 2 and not gates.reached("s2")
    gates.open("s1")
    assert first.result() == (completion(16), "length", True)
    wait_until(lambda: gates.reached("s2"), "the second stream runs once the first is done")
    gates.open("s2")
    assert second.result() == (completion(16), "length", True)


def test_prompt_over_the_context_is_400_before_any_token(one_slot):
    """docs/reliability.md case 12 (admission): the prompt's token count is checked against the slot's context."""
    c, _ = one_slot
    response = chat(c, "word " * 70)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "the prompt has 71 tokens; this model's context window is 64 tokens" in error["message"]
    body = chat(c, "short").json()  # no max_tokens: generate until the context is full
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 62, "total_tokens": 64}


# ---- crashes ---------------------------------------------------------------------------------------------


def test_worker_crash_fails_only_its_request_and_restarts(app_client, gates):
    """A native abort in a worker: 502 for that request; the other model keeps serving; the worker is restarted."""
    with app_client(preload=[FAKE, OTHER]) as c:
        wait_ready(c)
        other = Background(lambda: chat(c, "hold:o1", OTHER, max_tokens=3))
        wait_until(lambda: gates.reached("o1"), "the other model is generating")
        response = chat(c, "crash@2", max_tokens=10)
        error = response.json()["error"]
        assert response.status_code == 502 and error["code"] == "worker_crashed" and "signal SIGABRT" in error["message"]
        gates.open("o1")
        assert other.result().json()["choices"][0]["message"]["content"] == completion(3)
        wait_until(lambda: metric(c, "edgekit_worker_restarts_total", model=FAKE) == 1, "the crash is counted")
        wait_until(lambda: states(c)[FAKE] == "ready", "the crashed model is restarted")
        assert metric(c, "edgekit_worker_restarts_total", model=OTHER) == 0
        assert chat(c, "again", max_tokens=2).json()["choices"][0]["message"]["content"] == completion(2)


def test_crash_mid_stream_ends_the_stream_with_an_error_event(app_client):
    with app_client(preload=[FAKE]) as c:
        wait_ready(c)
        with c.stream("POST", "/v1/chat/completions", json={"model": FAKE, "messages": [{"role": "user", "content": "crash@3"}],
                                                           "max_tokens": 10, "stream": True}) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == completion(3)
        assert events[-1]["error"]["code"] == "worker_crashed"


def test_repeated_crashes_mark_the_model_failed_for_the_window(app_client):
    """More than restart_max crashes within restart_window_s: 503 model_unavailable + Retry-After, no more restarts."""
    with app_client(preload=[FAKE], restart_max=1, restart_window_s=60.0) as c:
        wait_ready(c)
        assert chat(c, "crash@0").status_code == 502
        wait_until(lambda: metric(c, "edgekit_worker_restarts_total", model=FAKE) == 1, "the first crash is counted")
        wait_until(lambda: states(c)[FAKE] == "ready", "restarted after the first crash")
        assert chat(c, "crash@0").status_code == 502
        wait_until(lambda: metric(c, "edgekit_worker_restarts_total", model=FAKE) == 2, "the second crash is counted")
        assert states(c)[FAKE] == "failed"
        refused_response = chat(c, "fine", max_tokens=2)
        error = refused_response.json()["error"]
        assert refused_response.status_code == 503 and error["code"] == "model_unavailable"
        assert refused_response.headers["retry-after"] == "60" and "2 times within 60 s" in error["message"]
        assert metric(c, "edgekit_worker_restarts_total", model=FAKE) == 2
        assert chat(c, "fine", OTHER, max_tokens=2).status_code == 200


# ---- lifecycle -------------------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(app_client, gates):
    """docs/reliability.md case 19: /health answers 503 + Retry-After while a model loads; a request meanwhile waits for the load."""
    load = gates.hold_load(FAKE)
    with app_client(preload=[FAKE]) as c:
        wait_until(lambda: gates.reached(load), "the preload is loading")
        first = c.get("/health")
        assert first.status_code == 503 and first.headers["retry-after"] == "1"
        assert first.json()["error"]["message"] == f"Loading model ({FAKE})"
        during = Background(lambda: chat(c, "during", max_tokens=2))
        wait_until(lambda: metric(c, "edgekit_queue_depth", model=FAKE) == 1, "the request waits for the load")
        assert c.get("/health").status_code == 503
        gates.open(load)
        assert during.result().json()["choices"][0]["message"]["content"] == completion(2)
        assert wait_ready(c)["loaded"] == [FAKE]


def test_idle_models_unload(app_client, gates):
    """A model idle for idle_unload_s is unloaded; one with a request in flight is not."""
    with app_client(idle_unload_s=0.2) as c:
        wait_ready(c)
        held = Background(lambda: chat(c, "hold:i1", max_tokens=2))
        wait_until(lambda: gates.reached("i1"), "the request is generating")
        assert states(c)[FAKE] == "ready"  # in use: never idle, however long the hold lasts
        gates.open("i1")
        assert held.result().status_code == 200
        wait_until(lambda: states(c)[FAKE] == "available", "the idle model is unloaded")
        assert metric(c, "edgekit_models_loaded") == 0


# ---- a daemon process: disconnects and SIGTERM --------------------------------------------------------


@pytest.fixture(scope="module")
def fake_daemon_models(tmp_path_factory, fake_gguf) -> Path:
    from serve_fixtures import FAKE_NAMES, publish_gguf

    models = tmp_path_factory.mktemp("fake-daemon") / "models"
    for name in FAKE_NAMES:
        publish_gguf(fake_gguf, models, name)
    return models


def start_daemon(models: Path, *args: str) -> tuple[Daemon, Gates]:
    gates = Gates(Path(tempfile.mkdtemp(prefix="gates-", dir=models.parent)))
    server = Daemon(models, "--worker-plugins", FAKE_PLUGIN, "--preload", FAKE, *args, env=gates.env())
    server.wait_ready()
    return server, gates


@pytest.fixture(scope="module")
def fake_daemon(fake_daemon_models: Path):
    server, gates = start_daemon(fake_daemon_models)
    try:
        yield server, gates
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


def body(text: str, **extra) -> dict:
    return {"model": FAKE, "messages": [{"role": "user", "content": text}], **extra}


def test_disconnect_cancels_streamed_generation(fake_daemon):
    """docs/reliability.md case 17 (streamed): closing the connection stops the generation where it is; the slot serves the next request."""
    daemon, _ = fake_daemon
    cancelled = daemon.metric("edgekit_generations_total", model=FAKE, finish_reason="cancelled")
    tokens = daemon.metric("edgekit_tokens_generated_total", model=FAKE)
    received = []
    request = body("hold:d1@3", max_tokens=100, stream=True)
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{daemon.url}/v1/chat/completions", json=request) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                received.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                if len(received) == 3:
                    break
    assert received == [" t1", " t2", " t3"]
    wait_until(lambda: daemon.metric("edgekit_generations_total", model=FAKE, finish_reason="cancelled") == cancelled + 1,
               "the generation is cancelled")
    assert daemon.metric("edgekit_tokens_generated_total", model=FAKE) - tokens == 3
    after = HTTP.post(f"{daemon.url}/v1/chat/completions", json=body("after", max_tokens=2), timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def test_disconnect_cancels_non_streamed_generation(fake_daemon):
    """docs/reliability.md case 17 (non-streamed): the client gives up before any byte of the answer; the generation stops."""
    daemon, gates = fake_daemon
    cancelled = daemon.metric("edgekit_generations_total", model=FAKE, finish_reason="cancelled")
    tokens = daemon.metric("edgekit_tokens_generated_total", model=FAKE)
    payload = json.dumps(body("hold:d2@5", max_tokens=100)).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(request)
        wait_until(lambda: gates.reached("d2"), "five tokens into the generation")
    wait_until(lambda: daemon.metric("edgekit_generations_total", model=FAKE, finish_reason="cancelled") == cancelled + 1,
               "the generation is cancelled")
    assert daemon.metric("edgekit_tokens_generated_total", model=FAKE) - tokens == 5
    assert daemon.metric("edgekit_active_requests", model=FAKE) == 0


def _stream_into(url: str, events: list[str], text: str, max_tokens: int) -> threading.Thread:
    def run() -> None:
        try:
            with HTTP.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                              json=body(text, max_tokens=max_tokens, stream=True)) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError:
            events.append("<cut>")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


# ---- the worker writes a stream's text to the client itself (edgekit/serve/handoff.py) -------------------------


def raw_exchange(port: int, payload: dict, version: str = "1.1", until_gate=None) -> tuple[int, bytes, bool]:
    """POST ``payload`` to /v1/chat/completions over a plain socket in HTTP/``version`` and read the answer with h11
    until the server ends it or closes: (status, body, whether the body ended as HTTP says it must).
    ``until_gate``: called before reading a byte (the client stalls until it returns)."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    data = json.dumps(payload).encode()
    head = [("host", f"127.0.0.1:{port}"), ("content-type", "application/json"), ("content-length", str(len(data)))]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if version == "1.1":
            sock.sendall(conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=head)) + conn.send(h11.Data(data=data)))
        else:  # h11 speaks only 1.1 as a client: an HTTP/1.0 request by hand, read as h11 reads any response
            lines = "".join(f"{k}: {v}\r\n" for k, v in head)
            sock.sendall(f"POST /v1/chat/completions HTTP/1.0\r\n{lines}\r\n".encode() + data)
            conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("connection", "close")]))
            conn.send(h11.EndOfMessage())
        if until_gate is not None:
            until_gate()
        status, body = 0, b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:  # the connection closed inside the body
                return status, body, False
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body, True
            elif isinstance(event, h11.ConnectionClosed):
                return status, body, False


def sse_data(body: bytes) -> list:
    """The events of an SSE body: JSON ones parsed, [DONE] as the string."""
    lines = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_a_streamed_answer_is_the_same_whoever_writes_its_text(fake_daemon):
    """HTTP/1.1: the worker writes the text events on the client's socket; HTTP/1.0 (no chunks): the daemon relays them.
    Same events, in order, each writer counted in /metrics."""
    daemon, _ = fake_daemon
    request = body("same", max_tokens=40, stream=True, stream_options={"include_usage": True})
    answers = {}
    for version, writer in (("1.1", "worker"), ("1.0", "daemon")):
        before = daemon.metric("edgekit_streams_total", model=FAKE, writer=writer)
        status, raw, complete = raw_exchange(daemon.port, request, version)
        assert (status, complete) == (200, True)
        assert daemon.metric("edgekit_streams_total", model=FAKE, writer=writer) == before + 1
        answers[version] = events = sse_data(raw)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [e["choices"][0]["delta"]["content"] for e in events[1:41]] == [f" t{i}" for i in range(1, 41)]
        assert events[41]["choices"][0]["finish_reason"] == "length"
        assert events[42]["usage"] == {"prompt_tokens": 2, "completion_tokens": 40, "total_tokens": 42}
        assert events[43:] == ["[DONE]"]
        assert {e["id"] for e in events[:43]} == {events[0]["id"]}
    strip = lambda events: [{k: v for k, v in e.items() if k not in ("id", "created")} for e in events[:-1]]  # noqa: E731
    assert strip(answers["1.1"]) == strip(answers["1.0"])


def test_a_client_that_reads_nothing_until_the_end_still_gets_every_event(fake_daemon):
    """The client reads nothing until the model is a token from the end (the fake's context holds 62); then every
    event arrives, in order, and the answer ends properly. (These ~10 KB fit the loopback buffers: the worker keeping
    what a full socket cannot take is tested on a small socket in test_serve_unit.py.)"""
    daemon, gates = fake_daemon
    request = body("hold:stall@59", max_tokens=60, stream=True)

    def stall() -> None:
        wait_until(lambda: gates.reached("stall"), "59 tokens written while the client reads nothing")
        gates.open("stall")

    status, raw, complete = raw_exchange(daemon.port, request, until_gate=stall)
    assert (status, complete) == (200, True)
    events = sse_data(raw)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == completion(60)
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


@pytest.fixture(scope="module")
def short_timeout_daemon(fake_daemon_models: Path):
    """A daemon whose requests time out after 2 s (its cases end by the timeout or a crash, never by a race with it)."""
    server, gates = start_daemon(fake_daemon_models, "--request-timeout-s", "2")
    try:
        yield server, gates
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


def test_a_handed_over_stream_that_times_out_ends_with_the_timeout_event(short_timeout_daemon):
    """The worker stops writing and gives the socket back before the daemon writes the error event after the text."""
    daemon, _ = short_timeout_daemon
    before = daemon.metric("edgekit_streams_total", model=FAKE, writer="worker")
    status, raw, complete = raw_exchange(daemon.port, body("hold:never@3", max_tokens=10, stream=True))
    assert (status, complete) == (200, True)
    events = sse_data(raw)
    assert daemon.metric("edgekit_streams_total", model=FAKE, writer="worker") == before + 1
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert texts == [f" t{i}" for i in range(1, len(texts) + 1)] and len(texts) <= 3  # what came before the deadline
    assert events[-1]["error"]["code"] == "timeout"


def test_a_worker_crash_cuts_a_handed_over_stream(short_timeout_daemon):
    """The worker may die inside an event it was writing: the daemon closes the connection instead of writing after
    it, so the client sees the answer cut (no end of the chunked body, no [DONE]), never a corrupt one. A relayed
    stream still ends with an error event (test_crash_mid_stream_ends_the_stream_with_an_error_event)."""
    daemon, _ = short_timeout_daemon
    before = daemon.metric("edgekit_streams_total", model=FAKE, writer="worker")
    status, raw, complete = raw_exchange(daemon.port, body("crash@3", max_tokens=10, stream=True))
    assert (status, complete) == (200, False)
    assert daemon.metric("edgekit_streams_total", model=FAKE, writer="worker") == before + 1
    events = sse_data(raw)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == completion(3)
    assert "[DONE]" not in events


def test_sigterm_finishes_in_flight_work_and_exits_0(fake_daemon_models: Path):
    """docs/reliability.md case 22: SIGTERM during a generation: no new connections, the stream finishes, exit code 0."""
    server, gates = start_daemon(fake_daemon_models, "--grace-s", "30")
    events: list[str] = []
    try:
        reader = _stream_into(server.url, events, "hold:t1@1", 24)
        wait_until(lambda: gates.reached("t1"), "the generation is under way")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refused(server.url), "the daemon stops accepting connections")
        gates.open("t1")
        reader.join(120)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks) and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == completion(24)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sigterm_cancels_what_outlasts_the_grace_period(fake_daemon_models: Path):
    """docs/reliability.md case 22: a generation still running at the end of --grace-s is cancelled; exit code 0."""
    server, gates = start_daemon(fake_daemon_models, "--grace-s", "0.5")
    events: list[str] = []
    try:
        reader = _stream_into(server.url, events, "hold:never@2", 24)
        wait_until(lambda: gates.reached("never"), "the generation is under way")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0  # the gate never opens: only the cancel can have ended the generation
        reader.join(60)
    finally:
        server.stop()
    assert "[DONE]" not in events


# ---- verification: a bundle is read in full once per change -------------------------------------------------


def test_worker_hashes_only_files_changed_since_they_were_verified(fake_models, monkeypatch):
    import edgekit.bundle
    from edgekit.serve.worker import verify_bundle_once

    hashed: list[str] = []
    real = edgekit.bundle.sha256_file
    monkeypatch.setattr(edgekit.bundle, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    bundle = fake_models / FAKE
    manifest, files = verify_bundle_once(bundle, None)
    assert hashed == ["model.gguf"] and [f.path for f in files] == ["manifest.json", "model.gguf"]
    assert verify_bundle_once(bundle, files) == (manifest, None) and hashed == ["model.gguf"]  # unchanged: not read again
    model = bundle / "model.gguf"
    copy = bundle / "copy.tmp"
    copy.write_bytes(model.read_bytes())
    copy.replace(model)  # same bytes, new file: its identity changed, so it is hashed again
    assert verify_bundle_once(bundle, files)[1] is not None and hashed == ["model.gguf"] * 2


def test_discovered_bundle_is_not_hashed_again_at_load_unless_it_changed(app_client, fake_models):
    """Discovery hashed the bundle; its worker trusts that while the files keep their identity, and re-checks a change."""
    with app_client(preload=[OTHER]) as c:
        wait_ready(c)
        services = c.app.state.services
        entries = services.catalog.entries
        assert entries[OTHER].worker.facts.files is not None  # a preloaded bundle is hashed by its worker
        assert chat(c, "first", max_tokens=2).status_code == 200
        assert entries[FAKE].worker.facts.files is None  # discovered: not read again at load
        model = fake_models / FAKE / "model.gguf"
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        tampered = model.with_suffix(".tmp")
        tampered.write_bytes(bytes(data))
        tampered.replace(model)
        c.portal.call(services.lifecycle.unload, entries[FAKE])  # on the app's event loop
        assert states(c)[FAKE] == "available"
        response = chat(c, "second", max_tokens=2)
        error = response.json()["error"]
        assert response.status_code == 503 and error["code"] == "model_unavailable" and "sha256 differs" in error["message"]
        assert chat(c, "other", OTHER, max_tokens=2).status_code == 200
