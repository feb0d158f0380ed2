"""Fixtures of the serving tests (a pytest plugin loaded by conftest.py): bundles, the fake model, a daemon process.

Bundles:
- the MiniLM ONNX bundle, exported for real (``edgekit.export``, int8-dynamic, ~40 s once per session);
- a SmolLM2 GGUF bundle that wraps the upstream Q4_1 GGUF from the model store (until the GGUF
  exporter's bundle is used here, this keeps the serving tests independent of it);
- tiny random BERT text/token classifiers exported through the real ONNX path (seconds);
- hostile bundles built here: a GGUF whose tokenizer type does not match its tokens (llama.cpp
  aborts with std::out_of_range when tokenizing), one with absurd header counts, one with a file
  that differs from its manifest, an ONNX model whose external data points outside the bundle;
- fake bundles: a tiny valid GGUF (one 16 x 8 tensor) that workers running the ``fake_runner`` plugin
  serve with the fake model of ``fake_runner.py`` instead of llama.cpp (milliseconds, deterministic).

Every real builder caches its bundle under pytest's session temp dir, so all modules share one copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from filelock import FileLock
from helpers import REPO, SMOLLM_GGUF, shared_temp, write_recipe

from edgekit.bundle import file_entries, publish, read_manifest, staging_dir
from edgekit.schema.manifest import MANIFEST_NAME, Manifest, RuntimeConfig
from edgekit.serve.settings import ServeSettings

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_NAME = "smollm2-135m-q4_1"
MINILM_NAME = "all-minilm-l6-v2-int8-dynamic"
SENTIMENT_NAME = "tiny-sentiment-int8"
NER_NAME = "tiny-ner-int8"
CRASH_NAME = "smollm2-bad-vocab"
FAKE_NAMES = ("fake-a", "fake-b")
FAKE_PLUGIN = "fake_runner"  # tests/fake_runner.py, imported by each worker
TESTS_DIR = Path(__file__).resolve().parent


def _cached(base: Path, name: str, build) -> Path:
    """``base/name``, built once per run: pytest-xdist workers wait on a file lock for the first builder."""
    target = base / name
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(base / f".{name}.lock"):
        if not (target / MANIFEST_NAME).is_file():
            build(base)
    return target


def publish_gguf(gguf_path: Path, out_dir: Path, name: str, *, chat_template: str | None = None) -> Path:
    """Publish ``gguf_path`` as a text-generation bundle with a manifest filled from its header."""
    from edgekit.runtime.gguf_file import gguf_facts, read_gguf_header

    header = read_gguf_header(gguf_path)
    facts = gguf_facts(header)
    template = chat_template or header.get("tokenizer.chat_template")
    with staging_dir(out_dir, name) as staged:
        _link_or_copy(str(gguf_path), str(staged / "model.gguf"))
        manifest = Manifest(
            name=name, recipe_name=name, recipe_sha256="0" * 64, source_id=str(gguf_path), task="text-generation",
            format="gguf", quantization=facts.quant_type, parameters=sum(t.n_elements for t in header.tensors),
            files=file_entries(staged),
            runtime=RuntimeConfig(max_length=facts.context_length, chat_template=template, context_length=facts.context_length),
            gguf=facts, passed=True, tools={"test-fixture": "publish_gguf"},
            created=datetime.now(timezone.utc).replace(microsecond=0),
        )
        return publish(staged, manifest, out_dir)


def craft_gguf(source: Path, target: Path, overrides: dict[str, object]) -> Path:
    """Copy a GGUF with some metadata values replaced (gguf.GGUFWriter; tensors copied byte for byte)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(target, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, field.contents())
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def smollm_gguf(sample_store: Path) -> Path:
    return sample_store / SMOLLM_GGUF / SMOLLM_FILE


def build_minilm(out_dir: Path) -> None:
    from edgekit.export import export
    from edgekit.schema.recipe import load_recipe

    export(load_recipe(REPO / "recipes/all-minilm-l6-v2.yaml"), out_dir, targets=["int8-dynamic"])


def build_tiny_classifier(out_dir: Path, task: str, name: str, labels: list[str], minilm_dir: Path, work: Path) -> None:
    """A 2-layer random BERT with a classification head, exported through the real ONNX path."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from edgekit.export import export
    from edgekit.schema.recipe import load_recipe

    torch.manual_seed(1)
    source = work / f"src-{name}"
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)})
    head = BertForSequenceClassification if task == "text-classification" else BertForTokenClassification
    head(config).eval().save_pretrained(source, safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_dir / file).exists():
            shutil.copy(minilm_dir / file, source / file)
    recipe = write_recipe(work / f"{name}.yaml", source, name=name.removesuffix("-int8"), task=task,
                          validation={"samples": ["good movie", "bad film, awful", "Paris is in France"],
                                      "gates": {"min_cosine_mean": 0.5}})
    export(load_recipe(recipe), out_dir)


@pytest.fixture(scope="session")
def bundle_cache(tmp_path_factory) -> Path:
    path = shared_temp(tmp_path_factory) / "serve-bundle-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def minilm_bundle(bundle_cache: Path, sample_store: Path) -> Path:
    return _cached(bundle_cache / "minilm", MINILM_NAME, build_minilm)


@pytest.fixture(scope="session")
def smollm_bundle(bundle_cache: Path, sample_store: Path) -> Path:
    return _cached(bundle_cache / "smollm", SMOLLM_NAME, lambda out: publish_gguf(smollm_gguf(sample_store), out, SMOLLM_NAME))


@pytest.fixture(scope="session")
def classifier_bundles(bundle_cache: Path, minilm_dir: Path) -> dict[str, Path]:
    out, work = bundle_cache / "classifiers", bundle_cache / "classifier-work"
    work.mkdir(exist_ok=True)
    return {
        "text-classification": _cached(out, SENTIMENT_NAME, lambda o: build_tiny_classifier(
            o, "text-classification", SENTIMENT_NAME, ["NEGATIVE", "POSITIVE"], minilm_dir, work)),
        "token-classification": _cached(out, NER_NAME, lambda o: build_tiny_classifier(
            o, "token-classification", NER_NAME, ["O", "B-LOC", "I-LOC"], minilm_dir, work)),
    }


@pytest.fixture(scope="session")
def crash_bundle(bundle_cache: Path, sample_store: Path) -> Path:
    """SmolLM2 with tokenizer.ggml.model 'llama' over GPT-2 tokens: loads, then aborts at tokenization."""
    def build(out: Path) -> None:
        crafted = craft_gguf(smollm_gguf(sample_store), bundle_cache / "bad-vocab.gguf",
                             {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default"})
        publish_gguf(crafted, out, CRASH_NAME)
        crafted.unlink()
    return _cached(bundle_cache / "crash", CRASH_NAME, build)


def link_bundles(target: Path, *bundles: Path) -> Path:
    """A models directory holding copies of ``bundles`` (hard links: no extra disk, same sha256)."""
    target.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        dest = target / bundle.name
        shutil.copytree(bundle, dest, copy_function=_link_or_copy)
    return target


def without_golden(models: Path, bundle: Path) -> Path:
    """A hard-linked copy of ``bundle`` in the folder ``models`` whose manifest holds no golden record.

    A worker reruns a bundle's golden record before it serves it: ~0.9 s of CPU per load of the exported SmolLM2. Tests
    about what the daemon does with requests load the copy; the record's check at load is tested where it is the point
    (test_serve_api.py, test_fleet.py, test_golden.py) and on the exported bundle served by test_tool_formats.py's
    daemon. The manifest is rewritten as a new file: the hard link would change the original's.
    """
    copy = link_bundles(models, bundle) / bundle.name
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["golden"] = None
    (copy / MANIFEST_NAME).unlink()
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def hostile_bundles(root: Path, good_gguf_bundle: Path, good_onnx_bundle: Path) -> dict[str, Path]:
    """Bundles that must be rejected at verification (docs/reliability.md case 1, 3, 5), each next to good ones."""
    from edgekit.bundle import MANIFEST_NAME

    bundles: dict[str, Path] = {}
    manifest = json.loads((good_gguf_bundle / MANIFEST_NAME).read_text())

    def clone(name: str, source: Path) -> Path:
        dest = root / name
        shutil.copytree(source, dest)
        data = json.loads((dest / MANIFEST_NAME).read_text())
        data["name"] = name
        (dest / MANIFEST_NAME).write_text(json.dumps(data))
        return dest

    def rehash(bundle: Path) -> None:
        data = json.loads((bundle / MANIFEST_NAME).read_text())
        data["files"] = [json.loads(e.model_dump_json()) for e in file_entries(bundle)]
        (bundle / MANIFEST_NAME).write_text(json.dumps(data))

    # 5: a file changed after export (sha256 differs from the manifest).
    tampered = bundles["tampered"] = clone("tampered-gguf", good_gguf_bundle)
    with (tampered / "model.gguf").open("r+b") as handle:
        handle.seek(-100, 2)
        byte = handle.read(1)
        handle.seek(-100, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    # 1: absurd tensor count in the header (hash re-made so only the header check can catch it).
    absurd = bundles["absurd-counts"] = clone("absurd-gguf", good_gguf_bundle)
    with (absurd / "model.gguf").open("r+b") as handle:
        handle.seek(8)
        handle.write(struct.pack("<Q", 2**32 + 7))
    rehash(absurd)
    # 1: truncated file (hash re-made).
    truncated = bundles["truncated"] = clone("truncated-gguf", good_gguf_bundle)
    with (truncated / "model.gguf").open("r+b") as handle:
        handle.truncate(manifest["files"][0]["bytes"] // 2)
    rehash(truncated)
    # 3: ONNX external data pointing outside the bundle.
    escape = bundles["onnx-escape"] = clone("escape-onnx", good_onnx_bundle)
    _point_external_data(escape / "model.onnx", "../../../../etc/passwd")
    rehash(escape)
    return bundles


def _point_external_data(model_path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(model_path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    onnx.save(model, str(model_path))


# ---- the fake model ------------------------------------------------------------------------------


def tiny_gguf(path: Path) -> Path:
    """A valid GGUF with the header facts a manifest needs and one 16 x 8 float32 tensor (what the fake model serves)."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    writer = GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"w{i}" for i in range(16)])
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_LLAMA_NAME = "tiny-llama-smollm2-vocab"


def tiny_llama_gguf(path: Path, tokenizer_source: Path) -> Path:
    """A runnable 2-layer llama GGUF (f16 random weights, 64 wide, 4 heads of 16, 2 KV heads, 1,024-token context) with
    the tokenizer of the GGUF ``tokenizer_source``: for tests that need llama.cpp to run a GGUF model, not its answers.

    Written with gguf-py, no PyTorch: ~0.4 s of CPU, most of it SmolLM2's 49,152-token vocabulary and merges.
    """
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType
    from helpers import gguf_metadata

    n_vocab, n_embd, n_head, n_head_kv, head_dim, n_ff, n_layer = 49152, 64, 4, 2, 16, 128, 2
    tokenizer = gguf_metadata(tokenizer_source)
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    for key in ("model", "pre"):
        writer.add_string(f"tokenizer.ggml.{key}", tokenizer[f"tokenizer.ggml.{key}"])
    for key in ("bos", "eos", "unknown", "padding"):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", tokenizer[f"tokenizer.ggml.{key}_token_id"])
    writer.add_token_list(tokenizer["tokenizer.ggml.tokens"])
    writer.add_token_types(tokenizer["tokenizer.ggml.token_type"])
    writer.add_token_merges(tokenizer["tokenizer.ggml.merges"])
    writer.add_chat_template(tokenizer["tokenizer.chat_template"])
    random = np.random.default_rng(0)

    def weight(rows: int, columns: int):
        return (random.standard_normal((rows, columns)) * 0.5).astype(np.float16)

    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))  # tied: no output.weight
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for layer in range(n_layer):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "attn_q.weight", weight(n_head * head_dim, n_embd))
        writer.add_tensor(block + "attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(block + "attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(block + "attn_output.weight", weight(n_embd, n_head * head_dim))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(block + "ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(block + "ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama_bundle(bundle_cache: Path, sample_store: Path) -> Path:
    """tiny_llama_gguf with SmolLM2's tokenizer, published as a text-generation bundle once per run."""
    def build(out: Path) -> None:
        path = tiny_llama_gguf(out / "tiny-llama.gguf", smollm_gguf(sample_store))
        publish_gguf(path, out, TINY_LLAMA_NAME)
        path.unlink()
    return _cached(bundle_cache / "tiny-llama", TINY_LLAMA_NAME, build)


@pytest.fixture(scope="session")
def fake_gguf(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("fake-gguf") / "fake.gguf")


@pytest.fixture
def fake_models(tmp_path: Path, fake_gguf: Path) -> Path:
    """A models directory with the fake bundles (each a real, verified gguf bundle of the tiny file)."""
    models = tmp_path / "models"
    for name in FAKE_NAMES:
        publish_gguf(fake_gguf, models, name)
    return models


class Gates:
    """The fake model's gates directory: the test opens gates and sees which ones a generation or load reached."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, name: str) -> None:
        (self.root / name).touch()

    def reached(self, name: str) -> bool:
        return (self.root / f"{name}.waiting").exists()

    def hold_load(self, model: str) -> str:
        """Make ``model``'s next load wait at the gate it returns."""
        (self.root / f"load-{model}.hold").touch()
        return f"load-{model}"

    def env(self) -> dict[str, str]:
        """What a daemon process needs to run the fake model in its workers."""
        path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        return {"EDGEKIT_FAKE_GATES": str(self.root), "PYTHONPATH": path}


@pytest.fixture
def gates(tmp_path: Path, monkeypatch) -> Gates:
    """Gates for the fake model; workers started by this test's in-process apps inherit the environment."""
    root = tmp_path / "gates"
    root.mkdir()
    result = Gates(root)
    for key, value in result.env().items():
        monkeypatch.setenv(key, value)
    return result


# ---- the daemon in-process with the fake model (fastapi's TestClient) -----------------------------------


BASE = "http://127.0.0.1:8080"  # TestClient base URL: a Host the daemon accepts
FAKE, OTHER = FAKE_NAMES


def fake_settings(models: Path, **overrides) -> ServeSettings:
    values = {"models": models, "worker_plugins": [FAKE_PLUGIN], "threads": 1, "n_ctx": 64, "idle_unload_s": 0,
              "grace_s": 2.0, "restart_window_s": 60.0, "memory_budget_mb": 4096}
    return ServeSettings(**(values | overrides))


def completion(n: int) -> str:
    """What the fake model writes for n completion tokens."""
    return "".join(f" t{i}" for i in range(1, n + 1))


def chat(client, text: str, model: str = FAKE, **body):
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}], **body})


def states(client) -> dict[str, str]:
    return {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}


class Background:
    """A request run in a thread; ``result()`` joins it."""

    def __init__(self, call) -> None:
        self.response = None
        self.thread = threading.Thread(target=self._run, args=(call,))
        self.thread.start()

    def _run(self, call) -> None:
        self.response = call()

    def result(self):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the request did not finish"
        return self.response

@contextlib.contextmanager
def model_client(models: Path, preload: str, **settings):
    """The daemon in-process (TestClient) serving ``models`` with ``preload`` loaded, one thread, never unloading."""
    from fastapi.testclient import TestClient

    from edgekit.serve.app import create_app

    app = create_app(ServeSettings(models=models, threads=1, idle_unload_s=0, preload=[preload], **settings))
    with TestClient(app, base_url=BASE) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "daemon ready", 300)
        yield client



def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll ``condition`` until it holds; the limit only turns a hang into a failure (no test asserts on time)."""
    deadline = time.monotonic() + limit_s
    pause = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {limit_s:.0f} s: {what}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)  # a long wait polls less often: the polls' CPU goes to what is awaited


def parse_metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus exposition text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- the daemon as a process ----------------------------------------------------------------------


# httpx.get builds a client, and with it an SSL context (~20 ms of CPU), per call; tests polling a daemon share this
# one, which like httpx.get opens a fresh connection per request (no keep-alive: connection counts stay exact).
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """`python -m edgekit serve` in a subprocess (``file_limit``: its RLIMIT_NOFILE, set by prlimit); its log goes to a file next to the models."""

    def __init__(self, models: Path, *args: str, key_file: Path | None = None, key: str | None = None,
                 env: dict[str, str] | None = None, file_limit: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = models.parent / f"daemon-{self.port}.log"
        limit = ["prlimit", f"--nofile={file_limit}:{file_limit}", "--"] if file_limit is not None else []
        command = [*limit, sys.executable, "-m", "edgekit", "serve", "--models", str(models), "--port", str(self.port),
                   "--threads", "1", "--n-ctx", "256", "--idle-unload-s", "0", *args]
        if key_file is not None:
            command += ["--api-key-file", str(key_file)]
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 240.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            try:
                return HTTP.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, f"daemon ready (log: {self.log})", timeout)

    def __enter__(self) -> Daemon:
        """Started and answering /health; stopped on leaving (also when it never became ready)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def metric(self, name: str, **labels) -> float:
        return parse_metric(HTTP.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text, name, **labels)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def refused(url: str) -> bool:
    """True once nothing accepts connections at ``url`` any more."""
    try:
        HTTP.get(f"{url}/health", timeout=1)
    except httpx.TransportError:
        return True
    return False


Q4KM = "smollm2-135m-instruct-q4-k-m"
RARE_TOKEN = 49151  # the last id of SmolLM2's vocabulary: never the most likely next token of these prompts


Q8 = "smollm2-135m-instruct-q8-0"


def build_smollm2(out_dir: Path) -> None:
    """The shipped SmolLM2 recipe exported as is, except that quality is measured on the eval text's first 512 tokens (one window;
    test_gguf_export.py covers several)."""
    import yaml

    from edgekit.export import export
    from edgekit.schema.recipe import load_recipe

    recipe = yaml.safe_load((REPO / "recipes/smollm2-135m-instruct.yaml").read_text())
    recipe["validation"]["text_file"] = str(REPO / "recipes" / recipe["validation"]["text_file"])
    recipe["validation"]["max_eval_tokens"] = 512
    path = out_dir.parent / "smollm2-135m-instruct.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    export(load_recipe(path), out_dir)


@pytest.fixture(scope="session")
def smollm2_exported(bundle_cache: Path, sample_store: Path) -> dict[str, Path]:
    """Every target of the shipped SmolLM2 recipe, exported by the real exporter once per run: {quant type: bundle}."""
    base = bundle_cache / "smollm2-recipe"
    _cached(base, Q4KM, build_smollm2)
    return {read_manifest(bundle).quantization: bundle for bundle in (base / Q8, base / Q4KM)}


@pytest.fixture(scope="session")
def smollm2_q4km(smollm2_exported: dict[str, Path]) -> Path:
    """The shipped SmolLM2 recipe's q4-k-m target."""
    return smollm2_exported["Q4_K_M"]


# ---- the SmolLM2 export served: shared by the files using it ---------------------------------------------------------

HERMES_MODEL = "smollm2-hermes-tools"
HERMES_TEMPLATE_PATH = TESTS_DIR / "data" / "chatml-hermes-tools.jinja"  # ChatML with the Hermes tool format (<tool_call>)
Q4KM_N_CTX = 1024  # the longest prompt (tools rendered, a call and its result) + answer of the files using Q4KM's clients


@pytest.fixture(scope="session")
def smollm2_hermes(bundle_cache: Path, smollm2_q4km: Path) -> Path:
    """The exported Q4_K_M published again with tests/data/chatml-hermes-tools.jinja as its chat template."""
    return _cached(bundle_cache / "hermes", HERMES_MODEL, lambda out: publish_gguf(
        smollm2_q4km / "model.gguf", out, HERMES_MODEL, chat_template=HERMES_TEMPLATE_PATH.read_text()))


@pytest.fixture(scope="session")
def smollm2_daemon(tmp_path_factory, smollm2_hermes: Path, smollm2_q4km: Path):
    """One daemon process (default slots, --n-ctx 1024) serving the Hermes bundle and the sample bundle as exported (its
    golden record checked at load), started on first use and shared by the files driving the official openai client
    against it (test_structured_output.py, test_tool_formats.py): one daemon start and two model loads per run."""
    models = link_bundles(tmp_path_factory.mktemp("smollm2-daemon") / "models", smollm2_hermes, smollm2_q4km)
    with Daemon(models, "--n-ctx", str(Q4KM_N_CTX)) as process:
        yield process


@pytest.fixture(scope="session")
def q4km_clients(tmp_path_factory, smollm2_q4km: Path):
    """``get(slots)``: the daemon in-process serving the exported Q4_K_M without its golden record (without_golden) with
    ``slots`` slots (1: one llama.cpp context per slot; 2: the batched context), started on first use and shared by
    test_structured_output.py and test_tool_calls.py: one model load per decode path per run instead of one per file."""
    models = tmp_path_factory.mktemp("q4km-clients") / "models"
    without_golden(models, smollm2_q4km)
    clients: dict[int, object] = {}
    with contextlib.ExitStack() as stack:
        def get(slots: int):
            if slots not in clients:
                clients[slots] = stack.enter_context(model_client(models, Q4KM, n_ctx=Q4KM_N_CTX, slots=slots))
            return clients[slots]

        yield get

