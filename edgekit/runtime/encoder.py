"""Run an ONNX encoder bundle: tokenize, infer with onnxruntime, pool / softmax as the manifest says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import RuntimeBackendError
from edgekit.schema.manifest import RuntimeConfig

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


def session_options(threads: int | None = None):
    """CPU session settings measured to be fastest for batch-1 encoders on small boards."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Fusions are already baked into the file at export; ENABLE_ALL adds the layout
    # transforms that are specific to the CPU the bundle runs on.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is None:  # the board's cores, as the daemon plans them (not every logical CPU of the machine)
        from edgekit.runtime.placement import plan_threads

        threads = plan_threads().threads
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Between parallel sections its threads sleep instead of spinning: spinning, they took the cores a llama.cpp worker
    # beside them waited for (8 clients mixing chats and embeddings for 40 s: 250 chats instead of 344, 492 embedding
    # requests instead of 680), and alone they were no faster (8 clients 65-68 requests/s either way; one client 52
    # spinning, 56 sleeping).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class EncoderModel:
    """A loaded ONNX encoder bundle. ``edgekit.runtime.verify.verify_for_runtime`` must have passed on it first
    (sha256 of every file, external-data paths inside the bundle)."""

    def __init__(self, bundle_dir: Path, config: RuntimeConfig, *, threads: int | None = None, model_path: Path | None = None, tokenizer_dir: Path | None = None
    ) -> None:
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile
        from tokenizers import Tokenizer

        self.bundle_dir = Path(bundle_dir)
        self.config = config
        model_path = model_path or self.bundle_dir / MODEL_FILE
        self.tokenizer = Tokenizer.from_file(str((tokenizer_dir or self.bundle_dir) / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(max_length=self.config.max_length)
        # The pad token tokenizer.json names (RoBERTa's <pad> is id 1), padded to the batch's longest text, never to a
        # fixed length; older bundles without padding there pad with [PAD].
        pad_id = (self.tokenizer.padding or {}).get("pad_id", self.tokenizer.token_to_id("[PAD]") or 0)
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id) or "[PAD]")
        try:
            self.session = ort.InferenceSession(str(model_path), session_options(threads), providers=["CPUExecutionProvider"])
        except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
            raise RuntimeBackendError(f"{model_path}: onnxruntime could not load the model: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts before truncation (for usage reporting and limits)."""
        self.tokenizer.no_truncation()
        try:
            return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]
        finally:
            self.tokenizer.enable_truncation(max_length=self.config.max_length)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token ids, attention mask and type ids, truncated and right-padded to the longest text."""
        return self.arrays(self.tokenizer.encode_batch(texts))

    @staticmethod
    def arrays(encodings) -> dict[str, np.ndarray]:
        """The model inputs of a batch of ``tokenizers`` encodings."""
        return {"input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
                "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64)}

    def feeds(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch = self.tokenize(texts)
        return {name: batch[name] for name in self.input_names}, batch["attention_mask"]

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """First output of the graph on a tokenized batch, and its attention mask."""
        return self.session.run(None, {name: batch[name] for name in self.input_names})[0], batch["attention_mask"]

    def forward(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """First output of the graph (hidden states or logits) and the attention mask."""
        return self.run(self.tokenize(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings, pooled and normalized as at export."""
        hidden, mask = self.forward(texts)
        return pool(hidden, mask, self.config.pooling, self.config.normalize)

    def classify(self, texts: list[str]) -> np.ndarray:
        """Class probabilities: (batch, labels) for sequences, (batch, tokens, labels) for tokens."""
        logits, _ = self.forward(texts)
        return softmax(logits.astype(np.float64))


PAIR_SEPARATOR = "\t"  # a text-ranking validation or golden sample is "query<TAB>document"


def split_pair(text: str) -> tuple[str, str]:
    """(query, document) of a text-ranking sample."""
    query, separator, document = text.partition(PAIR_SEPARATOR)
    if not separator:
        raise ValueError(f"a text-ranking sample needs a tab between query and document: {text[:80]!r}")
    return query, document


def relevance(logits: np.ndarray) -> np.ndarray:
    """Relevance scores in [0, 1] of a cross-encoder's logits (batch, labels).

    One logit: its sigmoid, as sentence-transformers' CrossEncoder and TEI's /rerank report it; two or more:
    the probability of the last label (the "relevant" class of two-label rerankers).
    """
    logits = logits.astype(np.float64)
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits[..., 0]))
    return softmax(logits)[..., -1]


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    """Mean (over real tokens) or CLS pooling, then optional L2 normalization; mirrors sentence-transformers."""
    if pooling == "mean":
        weights = mask[..., None].astype(hidden.dtype)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = hidden
    if normalize:
        pooled = pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)
    return pooled
