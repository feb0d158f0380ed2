"""Tasks as one table: which bundle format serves each, the worker op that answers it and its HTTP endpoint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One task a recipe can declare."""

    name: str
    format: str  # the bundle format that serves it (key of edgekit.formats.FORMATS)
    op: str  # worker op that answers it
    endpoints: tuple[str, ...]  # OpenAI-style routes of the daemon that answer it
    auto_model: str  # transformers Auto class of the reference model the bundle is compared with
    batched: bool = False  # the daemon micro-batches its texts; otherwise requests run in generation slots
    reads_pooler: bool = False  # the head reads BERT's pooler; otherwise export prunes it from the graph
    export_as: str | None = None  # optimum's export task when it is not ``name`` (the head is the same)
    pairs: bool = False  # inputs are (query, document) pairs; validation samples are "query<TAB>document" lines

    @property
    def export_task(self) -> str:
        return self.export_as or self.name


# Task name -> spec. Encoders run on onnxruntime, decoders on llama.cpp.
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("feature-extraction", format="onnx", op="embed", endpoints=("/v1/embeddings",), auto_model="AutoModel",
                 batched=True),
        TaskSpec("text-classification", format="onnx", op="classify", endpoints=("/v1/classify",),
                 auto_model="AutoModelForSequenceClassification", batched=True, reads_pooler=True),
        TaskSpec("token-classification", format="onnx", op="classify", endpoints=("/v1/classify",),
                 auto_model="AutoModelForTokenClassification", batched=True),
        # cross-encoders: a sequence classifier over (query, document) pairs whose one logit is the relevance
        TaskSpec("text-ranking", format="onnx", op="rerank", endpoints=("/v1/rerank",),
                 auto_model="AutoModelForSequenceClassification", batched=True, reads_pooler=True,
                 export_as="text-classification", pairs=True),
        TaskSpec("text-generation", format="gguf", op="generate", endpoints=("/v1/chat/completions", "/v1/completions"),
                 auto_model="AutoModelForCausalLM"),
    )
}


def tasks_of(fmt: str) -> tuple[str, ...]:
    """Tasks served by bundles of format ``fmt``, in table order."""
    return tuple(name for name, task in TASKS.items() if task.format == fmt)


def tasks_for(endpoint: str) -> tuple[str, ...]:
    """Tasks a daemon route answers, in table order."""
    return tuple(name for name, task in TASKS.items() if endpoint in task.endpoints)
