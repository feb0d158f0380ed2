"""Wire types of the OpenAI-compatible API: request bodies, validated strictly, and response models.

Request bodies: a wrong type is a 400, never coerced. Unknown fields are ignored, as OpenAI clients
send fields a small server does not know; known fields this server cannot honour (n > 1, logprobs,
a schema keyword constrained decoding does not enforce, ...) are refused naming the ``param``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_serializer

from edgekit.runtime import structured, tool_formats
from edgekit.runtime.llm import Sampling
from edgekit.serve.errors import ApiError, bad_param

M = TypeVar("M", bound=BaseModel)

SEED_MAX = 0xFFFFFFFE  # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(Body):
    """One part of a multi-part message; only text parts are supported."""

    type: Literal["text"] = Field(description="Content part type.")
    text: str = Field(description="The text.")


class FunctionCall(Body):
    name: str = Field(min_length=1, max_length=64, description="The function called.")
    arguments: str = Field(description="Its arguments, JSON text.")


class ToolCallIn(Body):
    """A call an assistant message made (sent back in the conversation)."""

    id: str = Field(min_length=1, max_length=256, description="The call's id.")
    type: Literal["function"] = Field(description="Only function calls.")
    function: FunctionCall


class ChatMessage(Body):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who wrote the message.")
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts.")
    name: str | None = Field(None, description="Optional author name.")
    tool_calls: list[ToolCallIn] | None = Field(None, description="Calls an assistant message made.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Body):
    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class GenerationBody(Body):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256, description="Bundle name.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, ge=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Sampling seed for reproducible output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion (not included).")
    n: int = Field(1, ge=1, description="Number of choices; only 1 is supported.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Must be 0 (not supported).")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Must be 0 (not supported).")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (must be empty).")
    user: str | None = Field(None, description="End-user id (ignored).")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self, max_tokens_cap: int) -> None:
        if self.n != 1:
            raise bad_param("n", "only n=1 is supported", "unsupported_value")
        stops = self.stops()
        if len(stops) > 4:
            raise bad_param("stop", "at most 4 stop sequences are allowed")
        if any(not s for s in stops):
            raise bad_param("stop", "stop sequences must not be empty")
        if self.limit is not None and self.limit > max_tokens_cap:
            raise bad_param(self.limit_param, f"{self.limit_param} is {self.limit}; this server allows at most {max_tokens_cap}")
        for param in ("presence_penalty", "frequency_penalty"):
            if getattr(self, param):
                raise bad_param(param, f"{param} is not supported; send 0 or leave it out", "unsupported_parameter")
        if self.logit_bias:
            raise bad_param("logit_bias", "logit_bias is not supported", "unsupported_parameter")

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def limit_param(self) -> str:
        return "max_tokens"

    def sampling(self) -> Sampling:
        return Sampling(max_tokens=self.limit, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                        stop=tuple(self.stops()))


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionSpec(Body):
    name: str = Field(pattern=FUNCTION_NAME, description="Function name: a-z, A-Z, 0-9, _ and -, at most 64.")
    description: str | None = Field(None, description="What the function does (shown to the model).")
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments: an object schema.")
    strict: bool | None = Field(None, description="Arguments always follow the schema here (constrained decoding).")


class ToolSpec(Body):
    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionSpec


class NamedFunction(Body):
    name: str = Field(min_length=1, max_length=64, description="The function to call.")


class NamedToolChoice(Body):
    type: Literal["function"] = Field(description="Only function tools.")
    function: NamedFunction


class JsonSchemaSpec(Body):
    name: str = Field(min_length=1, max_length=64, description="Name of the format.")
    description: str | None = Field(None, description="What the format is for.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema every response must match.")
    strict: bool | None = Field(None, description="Responses always follow the schema here (constrained decoding).")


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _format_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "Text", "json_object": "JsonObject", "json_schema": "JsonSchema"}.get(kind)


# Capitalised tags: pydantic puts a union's tag in an error's location, and ``_param`` leaves such names out.
ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("Text")] | Annotated[JsonObjectFormat, Tag("JsonObject")]
    | Annotated[JsonSchemaFormat, Tag("JsonSchema")],
    Discriminator(_format_type, custom_error_type="invalid_value",
                  custom_error_message="type must be 'text', 'json_object' or 'json_schema'"),
]


def _schema_error(param: str, exc: structured.UnsupportedSchema) -> ApiError:
    return ApiError(400, f"{param}: {exc.message}", param=param, code="unsupported_schema")


class Structured(BaseModel):
    """What a chat request asks of constrained decoding: the grammar, and for tools how the answer is read."""

    model_config = ConfigDict(frozen=True)

    grammar: str | None = None
    tools: bool = False
    system: str | None = None
    tool_format: str = tool_formats.GENERIC.name
    template_tools: list[dict[str, Any]] | None = Field(None, description="The template's tools variable (native formats).")

    @property
    def format(self) -> tool_formats.ToolFormat:
        return tool_formats.BY_NAME[self.tool_format]


class ChatBody(GenerationBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[ToolSpec] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or a named function.")
    parallel_tool_calls: bool | None = Field(None, description="Whether one answer may hold several calls (the default; "
                                             f"at most {tool_formats.MAX_CALLS}, one in formats without several); false: one.")
    functions: list[Any] | None = Field(None, description="Not supported (the deprecated form of tools).")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check_supported(self, max_tokens_cap: int) -> None:
        super().check_supported(max_tokens_cap)
        if self.logprobs or self.top_logprobs:
            raise bad_param("logprobs", "logprobs are not supported", "unsupported_parameter")
        if self.functions:
            raise bad_param("functions", "functions is not supported; send tools", "unsupported_parameter")

    def structured(self, fmt: tool_formats.ToolFormat = tool_formats.GENERIC) -> Structured:
        """Check response_format, tools and tool_choice and build the grammar (a 400 naming the param otherwise).

        ``fmt``: the tool format of the model's chat template (``tool_formats.detect``)."""
        tools = self.tools or []
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise bad_param("tools", "two tools have the same name")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise bad_param("tool_choice.function.name",
                                f"tool_choice names {choice.function.name!r}, which is not one of the tools")
            wanted: str | None = choice.function.name
        elif choice in ("auto", "required"):
            if not tools:
                raise bad_param("tool_choice", f"tool_choice {choice!r} needs tools")
            wanted = choice
        else:
            wanted = "auto" if tools and choice is None else None
        specs = []
        for index, tool in enumerate(tools):
            param = f"tools[{index}].function.parameters"
            try:
                parameters = structured.check_parameters(tool.function.parameters, "")
                structured.schema_grammar(parameters)  # refused here, naming this tool, not inside the combined grammar
            except structured.UnsupportedSchema as exc:
                raise _schema_error(param, exc) from None
            specs.append(structured.Tool(tool.function.name, tool.function.description, parameters))
        response_format = self.response_format
        wants_json = response_format is not None and response_format.type != "text"
        if wanted is not None:
            if wants_json:
                raise bad_param("response_format", "response_format json_object/json_schema cannot be combined with tools",
                                "unsupported_value")
            try:
                plan = structured.tool_plan(specs, wanted, fmt, parallel=self.parallel_tool_calls is not False)
            except structured.UnsupportedSchema as exc:
                raise _schema_error("tools", exc) from None
            given = tool_formats.template_tools([vars(t) for t in specs]) if fmt.native else None
            return Structured(grammar=plan.grammar, tools=True, system=plan.system, tool_format=fmt.name,
                              template_tools=given)
        if isinstance(response_format, JsonObjectFormat):
            return Structured(grammar=structured.schema_grammar(structured.JSON_OBJECT_GRAMMAR_SCHEMA), tool_format=fmt.name)
        if isinstance(response_format, JsonSchemaFormat):
            param = "response_format.json_schema.schema"
            if response_format.json_schema.schema_ is None:
                raise bad_param(param, "json_schema needs a schema", "missing_parameter")
            try:
                return Structured(grammar=structured.schema_grammar(response_format.json_schema.schema_), tool_format=fmt.name)
            except structured.UnsupportedSchema as exc:
                raise _schema_error(param, exc) from None
        return Structured(tool_format=fmt.name)

    def chars(self) -> int:
        return sum(len(m.text) + sum(len(c.function.arguments) for c in m.tool_calls or ()) for m in self.messages)

    def template_messages(self, plan: Structured | None = None) -> list[dict[str, Any]]:
        """The turns the chat template renders. Calls and results: with a native tool format, as the template's own
        ``tool_calls`` and ``tool`` turns; else written out in the generic tool-call format."""
        if plan is not None and plan.format.native:
            return [self.native_turn(m, plan.format) for m in self.messages]
        turns = []
        for m in self.messages:
            content = m.text
            if m.tool_calls:
                calls = structured.calls_text([(c.function.name, c.function.arguments) for c in m.tool_calls])
                content = "\n".join(([content] if content else []) + [calls])
            elif m.role == "tool":
                content = structured.tool_result_text(content, m.tool_call_id, m.name)
            turns.append({"role": m.role, "content": content, **({"name": m.name} if m.name else {})})
        if plan is not None and plan.system:
            turns = structured.with_system(turns, plan.system)
        return turns

    @staticmethod
    def native_turn(m: ChatMessage, fmt: tool_formats.ToolFormat) -> dict[str, Any]:
        """A message as templates with tool syntax read it (transformers' convention: arguments as an object; call
        ids in the form the template accepts)."""
        turn: dict[str, Any] = {"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})}
        if m.tool_calls:
            turn["tool_calls"] = [tool_formats.template_call(fmt, c.id, c.function.name, c.function.arguments)
                                  for c in m.tool_calls]
        if m.role == "tool" and m.tool_call_id:
            turn["tool_call_id"] = tool_formats.template_id(fmt, m.tool_call_id)
        return turn

    def sampling(self, plan: Structured | None = None) -> Sampling:
        base = super().sampling()
        if plan is None or plan.grammar is None:
            return base
        from dataclasses import replace

        return replace(base, grammar=plan.grammar, control_text=plan.tools)


class CompletionBody(GenerationBody):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one string).")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default: 16).")
    echo: bool = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, description="Only 1.")
    logprobs: int | None = Field(None, description="Not supported.")

    def check_supported(self, max_tokens_cap: int) -> None:
        super().check_supported(max_tokens_cap)
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise bad_param("prompt", "send one prompt (a string, or a list of exactly one string)", "unsupported_value")
        for param in ("echo", "suffix", "logprobs"):
            if getattr(self, param):
                raise bad_param(param, f"{param} is not supported", "unsupported_parameter")
        if self.best_of not in (None, 1):
            raise bad_param("best_of", "only best_of=1 is supported", "unsupported_value")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class InputsBody(Body):
    """Texts for an encoder model."""

    model: str = Field(min_length=1, max_length=256, description="Bundle name.")
    input: str | list[str] = Field(description="A text or a list of texts ('' is allowed; [] is not).")
    user: str | None = Field(None, description="End-user id (ignored).")

    def texts(self, max_inputs: int) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise bad_param("input", "input must be a string or a non-empty list of strings")
        if len(texts) > max_inputs:
            raise bad_param("input", f"{len(texts)} inputs in one request; at most {max_inputs} are allowed")
        return texts


class EmbeddingsBody(InputsBody):
    """POST /v1/embeddings: texts, or (as OpenAI accepts) arrays of the model's own token ids, special tokens included."""

    input: str | list[str] | list[Annotated[int, Field(ge=0)]] | list[str | list[Annotated[int, Field(ge=0)]]] = Field(
        description="A text, a list of texts, one array of token ids, or a list of such arrays ('' is allowed; [] is not).")

    def texts(self, max_inputs: int) -> list[str | list[int]]:
        if isinstance(self.input, list) and self.input and all(isinstance(x, int) for x in self.input):
            items: list[str | list[int]] = [list(self.input)]
        else:
            items = super().texts(max_inputs)
        for index, item in enumerate(items):
            if isinstance(item, list) and not item:
                raise bad_param(f"input[{index}]", "an array of token ids must not be empty")
        return items

    encoding_format: Literal["float", "base64"] = Field("float", description="Numbers, or base64 of float32 little-endian.")
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's width if given.")


class ClassifyBody(InputsBody):
    """POST /v1/classify."""

    top_k: int | None = Field(None, ge=1, description="Labels to return per text (default: all), highest score first.")


# ---- responses ----------------------------------------------------------------------------------------


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(Reply):
    name: str
    arguments: str


class ToolCall(Reply):
    """A call the model made: ``function.arguments`` is JSON text matching the function's parameters."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(Reply):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(Reply):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletion(Reply):
    """Response of POST /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(Reply):
    index: int = 0
    delta: dict[str, Any]
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Reply):
    """One server-sent event of a streamed chat completion (``usage`` only in the last one, when asked for)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(Reply):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(Reply):
    """Response of POST /v1/completions, and each streamed event (``usage`` only where it belongs)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class InputUsage(Reply):
    prompt_tokens: int
    total_tokens: int


class Embedding(Reply):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 little-endian.")


class EmbeddingList(Reply):
    """Response of POST /v1/embeddings."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: InputUsage


class LabelScore(Reply):
    label: str
    score: float


class Classification(Reply):
    index: int
    object: Literal["classification"] = "classification"
    label: str
    score: float
    labels: list[LabelScore]


class TokenEntity(Reply):
    token: str
    start: int
    end: int
    label: str
    score: float


class TokenClassification(Reply):
    index: int
    object: Literal["token_classification"] = "token_classification"
    entities: list[TokenEntity]


class ClassificationList(Reply):
    """Response of POST /v1/classify."""

    object: Literal["list"] = "list"
    data: list[Classification | TokenClassification]
    model: str
    usage: InputUsage


class ModelInfo(Reply):
    """Response of GET /v1/models/{name}."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["edgekit"] = "edgekit"
    task: str
    state: str


class ModelCard(Reply):
    """One model of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: Literal["edgekit"] = "edgekit"
    task: str
    format: str
    quantization: str
    state: str
    footprint_bytes: int


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class WorkerThreads(Reply):
    """The threads of every model worker (``--threads``, else the board's cores)."""

    threads: int
    cpus: list[int] | None = Field(description="CPUs the workers are pinned to; null: not pinned.")
    source: str = Field(description="Where the count comes from.")


class ModelVersion(Reply):
    """The version of a model served through an `edgekit update` link."""

    serving: str | None = Field(description="The version folder the model's worker runs (or loads next).")
    refused: str | None = Field(None, description="A version the link pointed at that failed to load; the serving one stayed.")
    error: str | None = Field(None, description="Why the refused version is not served.")


class Health(Reply):
    """GET /health once started: "ok" when everything listed serves, "degraded" while a bundle or model is refused or failed."""

    status: Literal["ok", "degraded"]
    models: int
    loaded: list[str]
    rejected: list[str] = Field(description="Bundle folders refused at verification.")
    failed: dict[str, str] = Field(description="Models that are not served now, with the reason (e.g. a failed golden check).")
    verifying: list[str] = Field(default_factory=list, description="Bundle folders being verified now.")
    threads: WorkerThreads = Field(description="Threads each model worker runs with, and where they come from.")
    versions: dict[str, ModelVersion] = Field(
        default_factory=dict, description="Models served through an `edgekit update` link: the version served, and a "
        "switched-to version that was refused.")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _param(loc: tuple) -> str | None:
    """OpenAI-style param path from a pydantic error location, without pydantic's union/type tags."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and item.isidentifier() and item.islower() and item not in _TYPE_TAGS:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON request body; every problem is a 400 naming the offending ``param``."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # In a union the deepest error is the informative one (content[0].type, not "should be a string").
        first = max(errors, key=lambda e: len(e["loc"])) if errors[0]["type"] != "json_invalid" else errors[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise ApiError(400, "the request body must be a JSON object", code="invalid_request") from None
        param = _param(first["loc"])
        if first["type"] == "missing":
            raise ApiError(400, f"{param} is required", param=param, code="missing_parameter") from None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value") from None
