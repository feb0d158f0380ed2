"""The daemon reloads a model in place when `edgekit update` switches its link (docs/fleet.md, "Update on the board").

The fake model (tests/fake_runner.py) holds generations at gates the test opens, so requests are in flight on
the old worker for as long as the test wants. Version 1 is the tiny GGUF with a 64-token context, version 2 the
same tensors with a 48-token context: a completion without max_tokens fills the context, so its token count
says which version computed it (62 or 46 after the 2-token chat prompt "user: X"). docs/reliability.md cases 35 and 36.
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from serve_fixtures import FAKE_PLUGIN, HTTP, Daemon, Gates, craft_gguf, publish_gguf, wait_until

from edgekit.fleet import board

V1_TOKENS, V2_TOKENS = 62, 46
IN_FLIGHT = 3  # held on the old worker; the fourth slot takes the requests sent after the switch


def install(bundles: Path, source: Path) -> str:
    """Keep ``source`` as a version of its model under ``bundles/.fleet`` and switch the link to it."""
    state = board.read_state(bundles, source.name)
    version = board.version_id("sha256:" + board.sha256_file(source / "manifest.json"))
    root = board.model_root(bundles, source.name)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, root / version)
    board.switch(bundles, source.name, version)
    state.versions.append(board.VersionRecord(version=version, digest="sha256:test", reference="test", installed="now"))
    board.write_state(bundles, state)
    return version


def workers(daemon: Daemon) -> list[str]:
    """The --bundle folder of every model worker the daemon runs now."""
    found = []
    for child in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "edgekit.serve.worker" in cmd and "serve" in cmd:
            found.append(Path(cmd[cmd.index("--bundle") + 1]).name)
    return found


def served_version(daemon: Daemon) -> dict:
    return HTTP.get(f"{daemon.url}/health", timeout=30).json().get("versions", {}).get("fake-a", {})


def chat(daemon: Daemon, content: str) -> httpx.Response:
    return HTTP.post(f"{daemon.url}/v1/chat/completions", timeout=180,
                      json={"model": "fake-a", "messages": [{"role": "user", "content": content}]})


@pytest.mark.parametrize("trigger", ["sighup", "poll"])
def test_switched_version_reloads_in_place_without_dropping_in_flight_requests(tmp_path, fake_gguf, trigger):
    out = tmp_path / "bundles"
    v1 = install(out, publish_gguf(fake_gguf, tmp_path / "s1", "fake-a"))
    short = craft_gguf(fake_gguf, tmp_path / "ctx48.gguf", {"llama.context_length": 48})
    v2_source = publish_gguf(short, tmp_path / "s2", "fake-a")
    gates = Gates(tmp_path / "gates")
    gates.root.mkdir()
    poll = "0" if trigger == "sighup" else "0.05"
    daemon = Daemon(out, "--worker-plugins", FAKE_PLUGIN, "--preload", "fake-a", "--slots", str(IN_FLIGHT + 1),
                    "--version-poll-s", poll, env=gates.env())
    held: dict[int, httpx.Response] = {}
    threads = [threading.Thread(target=lambda i=i: held.update({i: chat(daemon, f"hold:g{i}@1")})) for i in range(IN_FLIGHT)]
    try:
        daemon.wait_ready()
        assert served_version(daemon) == {"serving": v1, "refused": None, "error": None}
        assert chat(daemon, "x").json()["usage"]["completion_tokens"] == V1_TOKENS
        for thread in threads:
            thread.start()
        wait_until(lambda: all(gates.reached(f"g{i}") for i in range(IN_FLIGHT)), "every request is in flight on version 1")

        v2 = install(out, v2_source)
        if trigger == "sighup":
            daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served_version(daemon).get("serving") == v2, "the daemon serves version 2")
        # the old worker still holds the in-flight requests; a new one is answered by version 2 meanwhile
        assert sorted(workers(daemon)) == sorted([v1, v2])
        after = chat(daemon, "y")
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == V2_TOKENS
        assert held == {}  # none of the in-flight requests has finished yet

        for i in range(IN_FLIGHT):
            gates.open(f"g{i}")
        for thread in threads:
            thread.join(180)
        assert [held[i].status_code for i in range(IN_FLIGHT)] == [200] * IN_FLIGHT
        assert [held[i].json()["usage"]["completion_tokens"] for i in range(IN_FLIGHT)] == [V1_TOKENS] * IN_FLIGHT
        wait_until(lambda: workers(daemon) == [v2], "the old worker stopped once its requests were done")
        assert chat(daemon, "z").json()["usage"]["completion_tokens"] == V2_TOKENS
        health = HTTP.get(f"{daemon.url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["loaded"] == ["fake-a"]
    finally:
        for i in range(IN_FLIGHT):
            gates.open(f"g{i}")
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


def test_a_switched_version_that_fails_to_load_is_refused_and_the_old_one_keeps_serving(tmp_path, fake_gguf):
    """Version 2 crashes the bundle verifier: the daemon says so in /health, keeps version 1, and reloads nothing
    when the link is switched back."""
    out = tmp_path / "bundles"
    v1 = install(out, publish_gguf(fake_gguf, tmp_path / "s1", "fake-a"))
    v2_source = publish_gguf(craft_gguf(fake_gguf, tmp_path / "ctx48.gguf", {"llama.context_length": 48}), tmp_path / "s2", "fake-a")
    gates = Gates(tmp_path / "gates")
    gates.root.mkdir()
    daemon = Daemon(out, "--worker-plugins", FAKE_PLUGIN, "--preload", "fake-a", "--version-poll-s", "0.05", env=gates.env())
    try:
        daemon.wait_ready()
        (gates.root / "verify-fake-a.crash").touch()
        v2 = install(out, v2_source)
        wait_until(lambda: served_version(daemon).get("refused") == v2, "the daemon refuses version 2")
        state = served_version(daemon)
        assert state["serving"] == v1 and "verification failed" in state["error"]
        assert chat(daemon, "x").json()["usage"]["completion_tokens"] == V1_TOKENS
        assert workers(daemon) == [v1]
        board.switch(out, "fake-a", v1)
        wait_until(lambda: served_version(daemon) == {"serving": v1, "refused": None, "error": None}, "the refusal is cleared")
        assert workers(daemon) == [v1]
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()[-3000:]


# -- update --daemon's judgement of /health (no daemon: the answers are scripted, the clock is a counter) ----------


def _health(serving: str | None = None, refused: str | None = None, failed: str | None = None, status: str = "ok") -> dict:
    return {"status": status, "failed": {"m": failed} if failed else {},
            "versions": {"m": {"serving": serving, "refused": refused, "error": "golden check failed" if refused else None}}}


def _judge(monkeypatch, answers: list, probation_s: float, timeout_s: float = 10.0):
    from edgekit.fleet import daemon_check

    script = iter(answers)
    monkeypatch.setattr(daemon_check, "read_health", lambda url: next(script, answers[-1]))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return daemon_check.confirm_with_daemon("http://d", "m", "v2", timeout_s=timeout_s, probation_s=probation_s,
                                            clock=lambda: now[0], sleep=sleep), now[0]


def test_confirm_waits_for_the_new_version_then_through_the_probation_window(monkeypatch):
    answers = [None, {"status": "loading"}, _health("v1"), _health("v2"), _health("v2"), _health("v2"), _health("v2"),
               _health("v2"), _health("v2")]
    outcome, elapsed = _judge(monkeypatch, answers, probation_s=1.0)
    assert outcome.passed and elapsed == 1.75  # served from the fourth poll (0.75 s), then 1 s of probation


@pytest.mark.parametrize(("answer", "reason"), [
    (_health("v1", refused="v2"), "the daemon refused version v2: golden check failed"),
    (_health("v2", failed="worker stopped with signal SIGABRT (6 times within 300 s)"), "marked m failed on version v2"),
])
def test_confirm_fails_on_a_refusal_or_a_failure(monkeypatch, answer, reason):
    outcome, _ = _judge(monkeypatch, [_health("v2"), answer], probation_s=30.0)
    assert not outcome.passed and reason in outcome.detail


def test_confirm_fails_when_the_daemon_never_serves_the_version(monkeypatch):
    outcome, elapsed = _judge(monkeypatch, [_health("v1")], probation_s=0.0, timeout_s=2.0)
    assert not outcome.passed and "did not confirm version v2 within 2 s" in outcome.detail and elapsed == 2.0
