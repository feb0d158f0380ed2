"""Daemon parts that need no model: settings and CLI flags, request validation, the guard, batching, unit file.

The app here serves an empty models directory, so every test runs in milliseconds; the cases that
need a loaded model are in test_serve_api.py (in-process) and test_daemon.py (real subprocess).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgekit.errors import ConfigError
from edgekit.runtime.llm import StopScanner
from edgekit.serve.app import create_app
from edgekit.serve.batching import MicroBatcher
from edgekit.serve.errors import ApiError
from edgekit.serve.guard import host_name
from edgekit.serve.schemas import ChatBody, CompletionBody, EmbeddingsBody, parse_body
from edgekit.serve.settings import ServeSettings

BASE = "http://127.0.0.1:8080"
KEY = "k3y-for-tests-0123456789abcdef"


@pytest.fixture
def empty_models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def client(empty_models: Path):
    with TestClient(create_app(ServeSettings(models=empty_models)), base_url=BASE) as test_client:
        yield test_client


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- settings and the CLI derived from them ------------------------------------------------


def test_every_setting_is_described_and_has_a_cli_flag():
    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.cli import serve as serve_cli  # noqa: F401  (registers the commands)

    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    for name, field in ServeSettings.model_fields.items():
        assert field.description, name
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert f"EDGEKIT_{name.upper()}" in help_text, name


def test_flags_override_environment_which_overrides_defaults(monkeypatch, tmp_path):
    from edgekit.cli.serve import settings_from_flags

    monkeypatch.setenv("EDGEKIT_PORT", "9001")
    monkeypatch.setenv("EDGEKIT_SLOTS", "2")
    settings = settings_from_flags({"port": 9002, "models": tmp_path, "preload": ["a", "b"], "slots": None})
    assert (settings.port, settings.slots, settings.preload, settings.host) == (9002, 2, ["a", "b"], "127.0.0.1")
    with pytest.raises(ConfigError, match="--port"):
        settings_from_flags({"port": 70000})


def test_refuses_non_loopback_bind_without_key(tmp_path):
    """docs/reliability.md case 9: `serve --host 0.0.0.0` without a key exits 2 and says why; with a key the app builds."""
    done = subprocess.run([sys.executable, "-m", "edgekit", "serve", "--host", "0.0.0.0", "--models", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in done.stderr
    for host in ("192.168.1.10", "::", "my-board.local"):
        with pytest.raises(ConfigError, match="without an API key"):
            create_app(ServeSettings(models=tmp_path, host=host))
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert create_app(ServeSettings(models=tmp_path, host="0.0.0.0", api_key_file=key_file)) is not None
    key_file.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        create_app(ServeSettings(models=tmp_path, api_key_file=key_file))


# ---- the guard: Host, API key, body size ---------------------------------------------------


@pytest.mark.parametrize("value, name", [("localhost:8080", "localhost"), ("[::1]:8080", "::1"), ("127.0.0.1", "127.0.0.1"),
                                         ("Evil.Example:80", "evil.example"), ("::1", "::1")])
def test_host_name(value, name):
    assert host_name(value) == name


def test_host_header_checked_on_loopback(client):
    """docs/reliability.md case 8: a DNS-rebinding Host gets 403; loopback names pass."""
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io"):
        response = client.get("/v1/models", headers={"host": host})
        assert response.status_code == 403
        assert error_of(response)["code"] == "host_not_allowed"
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080"):
        assert client.get("/v1/models", headers={"host": host}).status_code == 200


def test_api_key_required_and_compared_in_constant_time(empty_models, tmp_path, monkeypatch):
    """docs/reliability.md case 7: no key / wrong key -> 401 OpenAI error; /health stays open; hmac.compare_digest decides."""
    import edgekit.serve.guard as guard

    compared = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    with TestClient(create_app(ServeSettings(models=empty_models, api_key_file=key_file)), base_url=BASE) as c:
        missing = c.get("/v1/models")
        assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
        wrong = c.get("/v1/models", headers={"authorization": "Bearer " + KEY[:-1] + "X"})
        assert wrong.status_code == 401 and error_of(wrong)["message"] == "incorrect API key"
        assert c.get("/v1/models", headers={"authorization": "Basic " + KEY}).status_code == 401
        assert c.post("/v1/chat/completions", json={"model": "m"}).status_code == 401
        assert c.get("/health").status_code in (200, 503)
        assert c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert compared == [(KEY[:-1].encode() + b"X", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_body_cap_413_before_reading(client):
    """docs/reliability.md case 13: a 10 MB body is refused by its Content-Length; a chunked one as soon as it passes the cap."""
    big = b'{"model": "x", "input": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    response = client.post("/v1/embeddings", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    sent = []

    def chunks():
        for _ in range(10):
            sent.append(1)
            yield b"a" * (1024 * 1024)

    response = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "exceeds the limit of 4194304 bytes" in error_of(response)["message"]


# ---- request validation: 400 naming the param, never 500 -----------------------------------

MALFORMED = [b"{:", b"[]", b"5", b"null", b'"text"', b"", b"\xff\xfe{}", b'{"model": "m", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
             b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', b"[" * 100000]


@pytest.mark.parametrize("raw", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_json_is_400(client, raw):
    """docs/reliability.md case 10: broken JSON, non-objects, invalid UTF-8, lone surrogates, deep nesting."""
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["code"] in ("invalid_json", "invalid_request")


BAD_MESSAGES = [
    ({"model": "m", "messages": None}, "messages"),
    ({"model": "m", "messages": "hello"}, "messages"),
    ({"model": "m", "messages": [123]}, "messages[0]"),
    ({"model": "m", "messages": [{}]}, "messages[0].role"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
]


@pytest.mark.parametrize("body, param", BAD_MESSAGES, ids=range(len(BAD_MESSAGES)))
def test_bad_messages_name_the_param(client, body, param):
    """docs/reliability.md case 10: messages null / string / [123] / [{}] ... -> 400 with the param."""
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


OUT_OF_RANGE = [
    ("temperature", 1e6), ("temperature", -0.1), ("temperature", "hot"), ("top_p", -1), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", 5000), ("max_tokens", 1.5), ("max_completion_tokens", 100000), ("n", 2),
    ("seed", -1), ("seed", "abc"), ("seed", 1.5), ("seed", 2**40), ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]),
    ("stream", "yes"), ("logprobs", True), ("tools", "all"), ("tool_choice", "sometimes"), ("presence_penalty", 1.0),
    ("response_format", {"type": "yaml"}), ("logit_bias", {"1": 5}),
]


@pytest.mark.parametrize("param, value", OUT_OF_RANGE, ids=[f"{p}={v!r}"[:40] for p, v in OUT_OF_RANGE])
def test_out_of_range_parameters_name_the_param(client, param, value):
    """docs/reliability.md case 11: temperature 1e6, top_p -1, max_tokens 0 or over the cap, n > 1, bad seeds, unknown knobs."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], param: value}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_completion_and_embedding_validation(client):
    cases = [
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "a", "echo": True}, "echo"),
        ("/v1/completions", {"model": "m", "prompt": 5}, "prompt"),
        ("/v1/embeddings", {"model": "m", "input": []}, "input"),
        ("/v1/embeddings", {"model": "m", "input": [[1, 2, 3], []]}, "input[1]"),
        ("/v1/embeddings", {"model": "m", "input": [[1, -2]]}, "input[0][1]"),
        ("/v1/classify", {"model": "m", "input": [[1, 2, 3]]}, "input[0]"),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/classify", {"model": "m", "input": "x", "top_k": 0}, "top_k"),
        ("/v1/embeddings", {"model": "m", "input": ["x"] * 2049}, "input"),
    ]
    for path, body, param in cases:
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert error_of(response)["param"] == param, (path, body)


def test_character_cap_before_tokenizing(empty_models):
    """docs/reliability.md case 14: 5,000,000 characters are refused by the character cap (body cap raised to let them in)."""
    settings = ServeSettings(models=empty_models, max_body_bytes=16 * 1024 * 1024)
    text = "x" * 5_000_000
    with TestClient(create_app(settings), base_url=BASE) as c:
        for path, body, param in [
            ("/v1/embeddings", {"model": "m", "input": text}, "input"),
            ("/v1/classify", {"model": "m", "input": [text[:2_500_000], text[:2_500_000]]}, "input"),
            ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}]}, "messages"),
            ("/v1/completions", {"model": "m", "prompt": text}, "prompt"),
        ]:
            response = c.post(path, json=body)
            assert response.status_code == 400
            error = error_of(response)
            assert (error["param"], error["code"]) == (param, "input_too_long")
            assert "5000000 characters" in error["message"]


def test_unknown_model_404_and_unknown_route(client):
    """docs/reliability.md case 16."""
    response = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404
    assert error_of(response) == {"message": "the model 'gpt-4' does not exist", "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}
    assert client.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404
    assert client.get("/v1/models/nope").status_code == 404
    assert error_of(client.get("/v2/whatever"))["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_parse_body_prefers_the_deepest_union_error():
    with pytest.raises(ApiError) as info:
        parse_body(EmbeddingsBody, b'{"model": "m", "input": ["ok", 7]}')
    assert info.value.param == "input[1]"
    body = parse_body(ChatBody, json.dumps({"model": "m", "max_completion_tokens": 7, "max_tokens": 3, "stop": "##",
                                            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                     {"type": "text", "text": "b"}]}]}).encode())
    assert body.limit == 7 and body.stops() == ["##"] and body.template_messages() == [{"role": "user", "content": "ab"}]
    assert parse_body(CompletionBody, b'{"model": "m", "prompt": ["p"]}').sampling().max_tokens == 16


# ---- generation helpers ------------------------------------------------------------------------


def test_stop_scanner_never_streams_part_of_a_stop_string():
    scanner = StopScanner(["</s>", "##"])
    emitted = []
    for piece in ["Hello", " <", "/", "x", "> wo", "rld #", "#", " tail"]:
        text, hit = scanner.feed(piece)
        emitted.append(text)
        if hit:
            break
    assert emitted == ["Hello", " ", "", "</x", "> wo", "rld ", ""]
    assert "".join(emitted) == "Hello </x> world "
    assert StopScanner([]).feed("abc") == ("abc", False)
    tail = StopScanner(["STOP"])
    assert tail.feed("ST") == ("", False) and tail.flush() == "ST"


def test_micro_batcher_merges_concurrent_requests_and_bounds_its_queue():
    calls: list[list[str]] = []

    async def run(texts):
        calls.append(list(texts))
        await asyncio.sleep(0.05)
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(run, max_batch=3, max_wait=0.01, max_queue=3)
        first = asyncio.create_task(batcher.submit(["a"]))
        await asyncio.sleep(0.02)  # first batch ["a"] is running; the next ones queue up
        rest = [asyncio.create_task(batcher.submit(t)) for t in (["b", "c"], ["d"], ["e"])]
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as full:
            await batcher.submit(["f"])
        results = [await first] + [await r for r in rest]
        await batcher.close()
        return results, full.value

    results, full = asyncio.run(main())
    assert results == [["A"], ["B", "C"], ["D"], ["E"]]
    assert calls == [["a"], ["b", "c", "d"], ["e"]]  # "e" would make 4 > max_batch 3
    assert (full.status, full.code, full.headers["Retry-After"]) == (503, "queue_full", "1")


# ---- memory budget and the systemd unit ---------------------------------------------------------


def smollm_manifest():
    """SmolLM2-135M Q4_1 as the fixture bundle describes it (facts from the upstream GGUF header)."""
    from datetime import datetime, timezone

    from edgekit.schema.manifest import FileEntry, GgufFacts, Manifest, RuntimeConfig

    facts = GgufFacts(architecture="llama", context_length=8192, n_layer=30, n_head=9, n_head_kv=3, n_embd=576,
                      n_vocab=49152, quant_type="Q4_1", bits_per_weight=5.85)
    return Manifest(name="smollm", recipe_name="smollm", recipe_sha256="0" * 64, source_id="store", task="text-generation",
                    format="gguf", quantization="Q4_1", parameters=134_515_008,
                    files=[FileEntry(path="model.gguf", bytes=98_362_432, sha256="1" * 64)],
                    runtime=RuntimeConfig(max_length=8192, context_length=8192), gguf=facts, passed=True,
                    created=datetime(2025, 1, 1, tzinfo=timezone.utc))


def test_footprint_of_smollm_follows_the_fit_estimate():
    """The daemon sizes a GGUF worker with edgekit.fit: one slot = the fit estimate; each extra slot adds its caches."""
    from edgekit.fit import RunSettings, estimate_memory, from_manifest, kv_cache_bytes
    from edgekit.fit.memory import LLAMA_VOCAB_BYTES_PER_TOKEN
    from edgekit.serve.budget import footprint_bytes

    manifest = smollm_manifest()
    facts = from_manifest(manifest)
    # 2 (K,V) * 4096 ctx * 30 layers * 3 kv heads * 64 head dim * 2 bytes (f16)
    assert kv_cache_bytes(facts, 4096) == 2 * 4096 * 30 * 3 * 64 * 2 == 94_371_840
    one = estimate_memory(facts, RunSettings(n_ctx=4096, parallel=1, daemon=False))
    # the worker also keeps one context's worth of saved prompts in RAM (serve's --prompt-cache-contexts default)
    assert footprint_bytes(manifest, ServeSettings(n_ctx=4096, slots=1)) == one.total + 94_371_840
    assert footprint_bytes(manifest, ServeSettings(n_ctx=4096, slots=1, prompt_cache_contexts=0)) == one.total
    # slots are sequences of one context sharing its KV pool: no second KV cache or vocabulary
    four = estimate_memory(facts, RunSettings(n_ctx=4096, parallel=4, daemon=False))
    assert footprint_bytes(manifest, ServeSettings(n_ctx=4096, prompt_cache_contexts=0)) == four.total
    assert (four.kv_cache, four.runtime) == (one.kv_cache, one.runtime) == (94_371_840, one.runtime)
    assert four.total - one.total < LLAMA_VOCAB_BYTES_PER_TOKEN * 49152
    assert 150 * 2**20 < one.total < 400 * 2**20  # 94 MiB of weights, 90 MiB of KV, runtime and buffers
    # n_ctx above the model's training context (8192) is capped at it
    assert footprint_bytes(manifest, ServeSettings(n_ctx=100_000)) == footprint_bytes(manifest, ServeSettings(n_ctx=8192))


def test_service_unit_is_hardened_and_sized(tmp_path):
    from edgekit.cli.serve import settings_from_flags
    from edgekit.serve.systemd import render_unit

    settings = settings_from_flags({"models": tmp_path, "preload": ["smollm"], "threads": 2})
    unit = render_unit(settings, "/opt/edgekit/bin/edgekit", 300 * 1024 * 1024, "test")
    lines = set(unit.splitlines())
    for line in ("DynamicUser=yes", "ProtectSystem=strict", "Restart=on-failure", "MemoryMax=460M", "NoNewPrivileges=yes",
                 "KillMode=mixed", "IPAddressDeny=any", "ProtectHome=yes", "CapabilityBoundingSet=",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in lines, line
    exec_line = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_line == (f"ExecStart=/opt/edgekit/bin/edgekit serve --models {tmp_path} --host 127.0.0.1 --port 8080 "
                         "--memory-budget-mb 300 --grace-s 10 --max-connections 128 --preload smollm --threads 2")
    assert "LimitNOFILE=256" in lines  # docs/reliability.md case 30: 128 connections + the daemon's own descriptors


@pytest.fixture
def readable_models():
    """A models folder with one bundle manifest that other users can read (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="edgekit-unit-", dir="/tmp"))
    root.chmod(0o755)
    bundle = root / "bundles" / "smollm"
    bundle.mkdir(parents=True, mode=0o755)
    (root / "bundles").chmod(0o755)
    bundle.chmod(0o755)
    (bundle / "manifest.json").write_text(smollm_manifest().model_dump_json())
    (bundle / "manifest.json").chmod(0o644)
    yield root / "bundles"
    shutil.rmtree(root)


def service_unit_cli(*args: str):
    from typer.testing import CliRunner

    from edgekit.cli import app
    from edgekit.cli import serve as serve_cli  # noqa: F401

    return CliRunner().invoke(app, ["service", "unit", *args])


def test_service_unit_command_sizes_memory_from_bundles(readable_models, tmp_path):
    result = service_unit_cli("--models", str(readable_models), "--n-ctx", "2048", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    from edgekit.serve.budget import MIB, footprint_bytes

    expected = footprint_bytes(smollm_manifest(), ServeSettings(n_ctx=2048))
    assert data["budget_bytes"] == expected and data["bundles"] == {"smollm": expected}
    assert f"MemoryMax={-(-expected // MIB) + 160}M" in data["unit"]
    assert f"--memory-budget-mb {-(-expected // MIB)}" in data["unit"]
    empty = service_unit_cli("--models", "/var/lib/edgekit/no-such-folder")
    assert empty.exception.exit_code == 2 and "no servable bundles" in str(empty.exception)


def test_service_unit_sizes_memory_max_from_the_device(readable_models):
    """--device: the budget is what `serve --device` offers models and MemoryMax stays inside the board's usable RAM."""
    from edgekit.schema.device import load_device
    from edgekit.serve.budget import DAEMON_RSS, MIB, device_budget, footprint_bytes

    zero = load_device("rpi-zero-2w")
    offered, _ = device_budget("rpi-zero-2w")
    board = service_unit_cli("--device", "rpi-zero-2w", "--memory-budget-mb", str(offered // MIB), "--json")
    assert board.exit_code == 0, board.output
    unit = json.loads(board.output)["unit"]
    assert f"--memory-budget-mb {offered // MIB}" in unit
    assert f"MemoryMax={zero.usable_ram_bytes // MIB}M" in unit  # 342 MiB on a 512 MB board, not budget + 160
    assert zero.usable_ram_bytes == offered + DAEMON_RSS
    # the bundle at 2048 tokens fits the zero alone: the budget is its footprint; at 8192 it does not (exit 1)
    small = service_unit_cli("--models", str(readable_models), "--device", "rpi-zero-2w", "--n-ctx", "1024", "--json")
    assert small.exit_code == 0, small.output
    need = footprint_bytes(smollm_manifest(), ServeSettings(models=readable_models, n_ctx=1024))
    assert json.loads(small.output)["budget_bytes"] == need
    big = service_unit_cli("--models", str(readable_models), "--device", "rpi-zero-2w", "--n-ctx", "8192")
    assert big.exception.exit_code == 1 and "rpi-zero-2w offers 262 MiB to models; smollm needs" in str(big.exception)
    rpi4 = service_unit_cli("--device", "rpi-4-2gb", "--json")  # no bundles here: the board's whole offer
    assert rpi4.exit_code == 0, rpi4.output
    assert json.loads(rpi4.output)["budget_bytes"] == device_budget("rpi-4-2gb")[0]
    over = service_unit_cli("--device", "rpi-zero-2w", "--memory-budget-mb", "1000")
    assert over.exception.exit_code == 2 and "more than rpi-zero-2w offers" in str(over.exception)


@pytest.mark.parametrize("where", ["home", "unreadable"])
def test_service_unit_refuses_a_models_folder_the_service_cannot_read(where, readable_models, tmp_path):
    if where == "home":
        models, reason = Path("/root/.cache/edgekit/bundles"), "under /root, which the service cannot see (ProtectHome=yes)"
    else:
        models, reason = readable_models, "is not readable by other users (mode -rw-------)"
        (readable_models / "smollm" / "manifest.json").chmod(0o600)
    result = service_unit_cli("--models", str(models), "--memory-budget-mb", "300")
    assert result.exception.exit_code == 2  # edgekit.cli.main prints the message and exits with this code
    message = str(result.exception)
    assert reason in message
    assert "sudo cp -r" in result.exception.hint and "--models /opt/edgekit/bundles" in result.exception.hint


def test_memory_budget_sources(empty_models):
    """--memory-budget-mb wins; --device takes the catalog's usable RAM minus the daemon; unknown device is exit 2."""
    from edgekit.errors import DeviceError
    from edgekit.serve.budget import DAEMON_RSS, MIB, memory_budget

    assert memory_budget(ServeSettings(models=empty_models, memory_budget_mb=300, device="rpi-4-2gb")) == (300 * MIB, "--memory-budget-mb")
    budget, source = memory_budget(ServeSettings(models=empty_models, device="rpi-4-2gb"))
    assert budget == (2048 - 250) * MIB - DAEMON_RSS and "rpi-4-2gb" in source
    with pytest.raises(DeviceError, match="unknown device"):
        memory_budget(ServeSettings(models=empty_models, device="no-such-board"))
    host, source = memory_budget(ServeSettings(models=empty_models))
    assert host > 0 and "available RAM" in source


def test_workers_get_the_configured_openmp_spin_count(empty_models, monkeypatch):
    """Workers spin as long as libgomp's default (llama-server's), stated so that the policy keeps it and so that a
    shared machine can bound it; 0 sleeps at once; null inherits the environment."""
    from edgekit.serve.discovery import Catalog
    from edgekit.serve.lifecycle import Lifecycle

    monkeypatch.delenv("EDGEKIT_OMP_SPIN_COUNT", raising=False)

    def env(**settings) -> dict[str, str]:
        values = ServeSettings(models=empty_models, **settings)
        return Lifecycle(values, Catalog(values)).worker_env()

    assert env() == {"GOMP_SPINCOUNT": "300000", "OMP_WAIT_POLICY": "ACTIVE"}
    assert env(omp_spin_count=1000) == {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "ACTIVE"}
    assert env(omp_spin_count=0) == {"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    assert env(omp_spin_count=None) == {}

def test_several_gguf_bundles_bound_the_workers_spin_unless_it_is_given(tmp_path, smollm_bundle, minilm_bundle, monkeypatch):
    """Two llama.cpp workers decoding at once on the same cores wait on each other's spinning threads (measured 2.5x
    slower at 300,000 turns): a models directory with several GGUF bundles gets the short spin by default."""
    import shutil

    from edgekit.schema.manifest import MANIFEST_NAME
    from edgekit.serve.lifecycle import worker_spin_count

    monkeypatch.delenv("EDGEKIT_OMP_SPIN_COUNT", raising=False)
    models = tmp_path / "models"
    for name, bundle in (("chat-a", smollm_bundle), ("embed", minilm_bundle), ("chat-b", smollm_bundle)):
        (models / name).mkdir(parents=True)
        shutil.copy(bundle / MANIFEST_NAME, models / name / MANIFEST_NAME)  # the count reads manifests only
        default, given = ServeSettings(models=models), ServeSettings(models=models, omp_spin_count=300000)
        counts = (worker_spin_count(default), worker_spin_count(given))
        assert counts == ((1000, 300000) if name == "chat-b" else (300000, 300000))



OPENMP_THREADS_SCRIPT = """
import os, sys, time
from edgekit.runtime.llm import GgufModel, Sampling
from edgekit.serve.worker import on_passing_thread

model = GgufModel(sys.argv[1], n_ctx=256, threads=2, prompt_cache_contexts=0)  # a team of 2, whatever the CPUs
prompt = model.tokenize("Once upon a time")
decode = lambda: list(model.generate(prompt, Sampling(max_tokens=2, temperature=0)))
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
on_passing_thread(decode)
deadline = time.monotonic() + 60  # the team's threads end right after the thread that started it
while threads() != before and time.monotonic() < deadline:
    time.sleep(0.01)
after_passing = threads()
decode()
print(before, after_passing, threads())
"""


def test_llama_cpp_work_before_serving_leaves_no_openmp_team_behind(sample_store):
    """The worker's golden checks run on a thread that ends with them: an OpenMP team started on the main thread would
    outlive them beside the decode thread's, and libgomp, counting more threads than cores, would cut every barrier's
    spin to 1,000 turns whatever GOMP_SPINCOUNT says (llama.cpp's threads then slept at most barriers of a step)."""
    from serve_fixtures import smollm_gguf

    out = subprocess.run([sys.executable, "-c", OPENMP_THREADS_SCRIPT, str(smollm_gguf(sample_store))],
                         capture_output=True, text=True, check=True, timeout=300)
    before, after_passing, after_main = map(int, out.stdout.split())
    assert after_passing == before  # the passing thread's team ended with it
    assert after_main == before + 1  # a team started on the main thread keeps its other thread for the process's life


@pytest.mark.parametrize(("given", "expected"), [
    ({}, {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "ACTIVE"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"GOMP_SPINCOUNT": "5"}, {"GOMP_SPINCOUNT": "5"}),
])
def test_a_process_loading_llama_cpp_bounds_its_spin_unless_told_otherwise(monkeypatch, given, expected):
    """Export and doctor run llama.cpp in their own process, maybe beside other work: a short spin (1,000 turns, not the
    workers' 300,000), unless the environment already sets how OpenMP waits (docs/reliability.md case 44)."""
    from edgekit.runtime.placement import bound_openmp_spin

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    bound_openmp_spin()
    assert {k: v for k, v in os.environ.items() if k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} == expected


def test_encoder_micro_batches_are_split_by_padded_tokens(minilm_dir):
    """A worker never runs more than batch_max_tokens (texts x longest) at once: that bounds its activation memory."""
    from tokenizers import Tokenizer

    from edgekit.serve.runners import EncoderRunner

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=64)
    tokenizer.enable_padding()
    runner = EncoderRunner.__new__(EncoderRunner)
    runner.batch_max, runner.batch_tokens = 4, 40
    texts = ["a b", "a b c", "word " * 100, "x", "y", "z", "w", "v"]  # 4, 5, 64 (truncated), then 3 each
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(texts)]
    assert runner.chunks(lengths) == [(0, 2), (2, 3), (3, 7), (7, 8)]
    assert runner.chunks([]) == []


def test_service_unit_prints_long_lines_verbatim(tmp_path):
    done = subprocess.run([sys.executable, "-m", "edgekit", "service", "unit", "--models", "/opt/edgekit/bundles",
                           "--memory-budget-mb", "500", "--preload", "a-model-with-a-rather-long-bundle-name-q4-k-m",
                           "--exec", "/opt/edgekit/.venv/bin/edgekit"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "60"})
    assert done.returncode == 0, done.stderr
    exec_lines = [line for line in done.stdout.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_lines) == 1 and exec_lines[0].endswith("--preload a-model-with-a-rather-long-bundle-name-q4-k-m")


def test_protocol_messages_are_typed_and_validated_at_the_boundary():
    """Daemon <-> worker frames carry one message of a discriminated union; anything else is a ProtocolError."""
    import io
    import struct

    from edgekit.runtime.llm import Delta, Finish, Sampling
    from edgekit.serve.protocol import (
        DeltaMessage,
        Done,
        FrameBuffer,
        Generate,
        ProtocolError,
        encode_frame,
        read_frame_sync,
    )

    job = Generate(id="r1", messages=[{"role": "user", "content": "hi"}], sampling=Sampling(max_tokens=3, stop=("x",)))
    message, payload = read_frame_sync(io.BytesIO(encode_frame(job)))
    assert message == job and payload == b"" and message.sampling == Sampling(max_tokens=3, stop=("x",))

    def from_worker(data: bytes, piece: int = 1):
        """What the daemon reads from ``data`` arriving ``piece`` bytes at a time, then the end of the stream."""
        buffer, frames = FrameBuffer(), []
        for start in range(0, len(data), piece):
            frames += buffer.feed(data[start:start + piece])
        buffer.close()
        return frames

    done = Done(id="r1", finish=Finish("length", 5, 3))
    frames = encode_frame(DeltaMessage(id="r1", delta=Delta("é", 1))) + encode_frame(done, b"\x00\x01")
    for piece in (1, 7, len(frames)):  # a frame split anywhere, or several in one read
        assert from_worker(frames, piece) == [(DeltaMessage(id="r1", delta=Delta("é", 1)), b""), (done, b"\x00\x01")]
    with pytest.raises(ProtocolError, match="truncated frame"):  # the worker died inside a frame
        from_worker(frames[:-1])

    def raw(header: dict) -> bytes:
        head = json.dumps(header).encode()
        return struct.pack("!II", len(head), 0) + head

    for bad in ({"type": "start", "id": "r1", "prompt_tokens": 3},  # undocumented type
                {"type": "delta", "id": "r1", "text": "x", "tokens": 1},  # fields outside the Delta
                {"type": "done", "id": "r1", "finish": {"reason": "eos", "prompt_tokens": 1, "completion_tokens": 0}}):
        with pytest.raises(ProtocolError):
            from_worker(raw(bad))
    with pytest.raises(ProtocolError):  # a worker message is not a job
        read_frame_sync(io.BytesIO(encode_frame(done)))


# ---- a worker writing to the client's socket (handoff.py) -------------------------------------------------


def _sink_pair(send_buffer: int | None = None, seconds: float = 600.0):
    """A ClientSink on one end of a socket pair (``send_buffer``: its SO_SNDBUF; the request's deadline ``seconds``
    away) and the other end, the client."""
    import socket
    import time

    from edgekit.serve.handoff import ClientSink

    ours, client = socket.socketpair()
    if send_buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    sink = ClientSink(os.dup(ours.fileno()), 'data: {"t":', "}\n\n", time.monotonic() + seconds)
    ours.close()  # the sink holds the only copy, as a worker does
    return sink, client


def _read_all(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_sink_writes_each_delta_as_one_http_chunk_holding_one_event():
    sink, client = _sink_pair()
    sink.write("héllo")
    sink.write(' "quoted"\n')
    assert sink.finish() is True
    event1 = 'data: {"t":"héllo"}\n\n'.encode()
    event2 = b'data: {"t":" \\"quoted\\"\\n"}\n\n'
    assert _read_all(client) == b"%x\r\n%b\r\n%x\r\n%b\r\n" % (len(event1), event1, len(event2), event2)


def test_a_sink_keeps_what_a_slow_client_cannot_take_and_writes_it_in_order_at_the_end():
    import threading

    sink, client = _sink_pair(send_buffer=4096)
    sent = 0
    while not sink.pending:  # the client reads nothing: the socket fills, the rest waits in the sink
        sink.write(f"word{sent}")
        sent += 1
        assert sent < 10_000
    for i in range(sent, sent + 100):  # never blocks: the decode thread goes on
        sink.write(f"word{i}")
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(client)))
    reader.start()
    assert sink.finish() is True
    reader.join()
    events = [json.loads(line[6:])["t"] for line in received[0].decode().split("\r\n") if line.startswith("data: ")]
    assert events == [f"word{i}" for i in range(sent + 100)]


def test_a_sink_gives_up_on_a_client_that_never_reads_and_on_one_that_left():
    for sink, give_up in ((_sink_pair(send_buffer=4096, seconds=0.05)[0], lambda: False),  # at the request's deadline
                          (_sink_pair(send_buffer=4096)[0], lambda: True)):  # when the generation is cancelled
        while not sink.pending:
            sink.write("x" * 100)
        assert sink.finish(give_up) is False  # the client still has not read: the socket is released, incomplete
        assert sink.sock.fileno() == -1
    sink, client = _sink_pair()
    client.close()
    sink.write("a")  # EPIPE: the client left
    assert sink.broken is True
    sink.write("b")  # and nothing more is tried
    assert sink.finish() is False
