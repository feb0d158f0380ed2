"""``POST /v1/rerank``: a query's documents scored by a cross-encoder (text-ranking) ONNX bundle.

The request and response are the shape llama-server's ``/v1/rerank`` and Jina/Cohere-style clients use
(``query``, ``documents``, ``top_n``; ``results`` of ``index`` and ``relevance_score``, best first); ``texts``
is accepted for ``documents`` as llama-server accepts it (TEI's name). ``POST /rerank`` answers TEI's shape:
a list of ``{index, score[, text]}``. Scores are the model's relevance in [0, 1] (the sigmoid of its one logit).

A request is one job for the model's worker (query + documents, scored in micro-batches of at most
``--batch-max`` pairs and ``--batch-max-tokens`` tokens there); it takes the model's turn through the same
bounded queue as a generation (503 + Retry-After when full).
"""

from __future__ import annotations

import array
import asyncio
import time
from functools import partial

from fastapi import APIRouter, Depends, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from edgekit.formats import tasks_for
from edgekit.serve.errors import ApiError, bad_param
from edgekit.serve.guard import allowed_host, authenticated, body_within_limit, json_body, read_body, same_origin
from edgekit.serve.lifecycle import ModelEntry
from edgekit.serve.protocol import Encode
from edgekit.serve.routes import Services, Svc, check_chars, model_entry, unless_client_leaves
from edgekit.serve.schemas import parse_body

RERANK_TASKS = tasks_for("/v1/rerank")

rerank = APIRouter(dependencies=[Depends(allowed_host), Depends(same_origin), Depends(authenticated),
                                  Depends(body_within_limit), Depends(json_body)])


class RerankBody(BaseModel):
    """POST /v1/rerank (llama-server, Jina, Cohere) and POST /rerank (TEI)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)

    model: str = Field(min_length=1, max_length=256, description="Bundle name.")
    query: str = Field(min_length=1, description="What the documents are scored against.")
    documents: list[str] = Field(validation_alias=AliasChoices("documents", "texts"),
                                 description="The texts to score (`texts` is accepted too); at least one.")
    top_n: int | None = Field(None, ge=1, description="Return only the best N results (default: all).")
    return_documents: bool = Field(False, validation_alias=AliasChoices("return_documents", "return_text"),
                                   description="Include each document's text in its result.")

    def checked(self, max_documents: int) -> list[str]:
        if not self.documents:
            raise bad_param("documents", "documents must be a non-empty list of strings")
        if len(self.documents) > max_documents:
            raise bad_param("documents", f"{len(self.documents)} documents in one request; at most {max_documents} are allowed")
        return list(self.documents)


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RerankDocument(Reply):
    text: str


class RerankResult(Reply):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(description="Relevance in [0, 1].")
    document: RerankDocument | None = None


class RerankUsage(Reply):
    prompt_tokens: int
    total_tokens: int


class RerankList(Reply):
    object: str = "list"
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class TeiRank(Reply):
    index: int
    score: float
    text: str | None = None


async def relevance_scores(svc: Services, entry: ModelEntry, query: str, documents: list[str]) -> tuple[list[float], int]:
    """Each document's relevance to ``query`` and the tokens the model read, with the model's turn held meanwhile."""
    timeout = svc.settings.request_timeout_s
    deadline = time.monotonic() + timeout
    await svc.admission.acquire_slot(entry, timeout=timeout)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            worker = await svc.lifecycle.ensure_loaded(entry)
            stream = await worker.submit(partial(Encode, type="rerank", texts=[query, *documents]))
            try:
                result, payload = await stream.next()
            finally:
                stream.close()
    except TimeoutError:
        raise ApiError(504, f"the request did not finish within {timeout:.0f} s", code="timeout") from None
    finally:
        svc.admission.release_slot(entry)
    values = array.array("f")
    values.frombytes(payload)
    if result.shape != [len(documents), 1] or len(values) != len(documents):
        raise RuntimeError(f"model {entry.name!r} answered {result.shape} scores for {len(documents)} documents")
    return list(values), sum(result.tokens)


async def ranked(request: Request, svc: Services, path: str) -> tuple[RerankBody, ModelEntry, list[tuple[int, float]], int]:
    body = parse_body(RerankBody, await read_body(request, svc.settings.max_body_bytes))
    documents = body.checked(svc.settings.max_embedding_inputs)
    check_chars(svc, len(body.query) * len(documents) + sum(map(len, documents)), "documents")
    entry = await model_entry(svc, request, body.model, RERANK_TASKS, path)
    scores, tokens = await unless_client_leaves(request, relevance_scores(svc, entry, body.query, documents))
    order = sorted(enumerate(scores), key=lambda pair: -pair[1])[: body.top_n]
    return body, entry, order, tokens


@rerank.post("/v1/rerank", response_model_exclude_none=True)
async def rerank_documents(request: Request, svc: Svc) -> RerankList:
    body, entry, order, tokens = await ranked(request, svc, "/v1/rerank")
    results = [RerankResult(index=i, relevance_score=score,
                            document=RerankDocument(text=body.documents[i]) if body.return_documents else None)
               for i, score in order]
    return RerankList(model=entry.name, results=results, usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens))


@rerank.post("/rerank", response_model_exclude_none=True)
async def rerank_tei(request: Request, svc: Svc) -> list[TeiRank]:
    body, _, order, _ = await ranked(request, svc, "/rerank")
    return [TeiRank(index=i, score=score, text=body.documents[i] if body.return_documents else None) for i, score in order]
