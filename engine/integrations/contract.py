"""The gateway's contract: what each route takes, checked before a call is held, and the
OpenAPI 3 description of the routes built from the same models (``GET /openapi.json``).

The request models type every field the gateway reads (the model, the messages and their
content, the input, ``stream``, ``stream_options``, the output caps, ``response_format``,
``tools``); anything else in a body passes to the provider unchecked, as sent. Output caps
are at most ``MAX_TOKENS``, so a hold's worst case and the ledger's integers (SQLite's are
signed 64-bit) cannot overflow. A body is parsed with its nesting bounded (``loads``): the
standard library's decoder stops at the interpreter's recursion limit with a RecursionError,
which is refused here like anything nested deeper than ``MAX_DEPTH``, so nothing the gateway
does with a body later (routing, re-encoding it for the provider) can recurse too deep.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from engine.models import FieldError

MAX_DEPTH = 64  # JSON nesting of a request body (a tool's JSON schema ten levels deep is about 25)
MAX_TOKENS = 2**31 - 1  # an output cap (max_tokens and its kin); more than any model writes

TokenCap = Annotated[int, Field(ge=1, le=MAX_TOKENS, description=f"at most {MAX_TOKENS:,}")]


def loads(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON body, its nesting at most ``max_depth``; FieldError("body") otherwise."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise FieldError("body", f"is nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise FieldError("body", "is not valid JSON") from None
    # Brackets can nest only as deep as there are of them: most bodies stop here.
    if raw.count(b"[") + raw.count(b"{") > max_depth and _deeper(value, max_depth):
        raise FieldError("body", f"is nested deeper than {max_depth} levels")
    return value


def _deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# ---------------------------------------------------------------------------- request models


class _Open(BaseModel):
    """Typed where the gateway reads; other fields allowed and passed on as sent."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Open):
    type: str | None = None
    text: str | None = None


class Message(_Open):
    role: str | None = None
    content: str | list[ContentPart] | None = Field(
        None, description="a string, a list of content parts (objects) or null")
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class ResponseFormat(_Open):
    type: str


class _Call(_Open):
    model: str = Field(min_length=1, description="a non-empty string (the model's name)")
    stream: bool | None = None
    max_tokens: TokenCap | None = None
    max_completion_tokens: TokenCap | None = None
    max_output_tokens: TokenCap | None = None


class ChatRequest(_Call):
    """``POST /v1/chat/completions``: OpenAI's Chat Completions."""

    messages: list[Message] = Field(min_length=1, description="a non-empty list of message objects")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None


class EmbeddingsRequest(_Open):
    """``POST /v1/embeddings``."""

    model: str = Field(min_length=1, description="a non-empty string (the model's name)")
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] = Field(
        description="a string, or a non-empty list of strings or of token ids")


class ResponseItem(_Open):
    role: str | None = None
    content: str | list[ContentPart] | None = Field(
        None, description="a string, a list of content parts (objects) or null")


class ResponsesRequest(_Call):
    """``POST /v1/responses``: OpenAI's Responses API."""

    input: str | list[ResponseItem] = Field(description="a string or a list of input items (objects)")


class MessagesRequest(_Call):
    """``POST /v1/messages``: Anthropic's Messages API."""

    messages: list[Message] = Field(min_length=1, description="a non-empty list of message objects")


REQUESTS: dict[str, type[_Open]] = {"chat": ChatRequest, "embeddings": EmbeddingsRequest,
                                     "responses": ResponsesRequest, "messages": MessagesRequest}
# The field names of the models: a validation error's location is told by these (and list
# indexes); any other name in it is pydantic's for a member of a union.
_MODELS: tuple[type[BaseModel], ...] = (ContentPart, Message, StreamOptions, ResponseFormat, *REQUESTS.values())
_FIELDS = frozenset(name for model in _MODELS for name in model.model_fields)


def check(kind: str, body: dict[str, Any]) -> None:
    """Raise FieldError naming the first field of ``body`` the route cannot take, and why."""
    try:
        REQUESTS[kind].model_validate(body)
    except ValidationError as exc:
        raise _field_error(kind, exc.errors(include_url=False)) from None


def _field_error(kind: str, errors: list[Any]) -> FieldError:
    """The first error, named by its field's path (``messages[0].content``). Where a field of
    several shapes (a union) matched none: the deeper error of the one shape the value had
    (a list whose item is wrong), else the shapes it takes."""
    loc = errors[0]["loc"]
    tag = next((i for i, part in enumerate(loc) if not isinstance(part, int) and part not in _FIELDS), None)
    error = errors[0]
    if tag is not None:
        deeper = [e for e in errors if e["loc"][:tag] == loc[:tag] and len(e["loc"]) > tag + 1]
        if len(deeper) != 1:
            return FieldError(_path(loc[:tag]), f"must be {_shape(kind, loc[:tag])}")
        error = deeper[0]
    path = _path(error["loc"]) or "body"
    if error["type"] in _SHAPE_ERRORS and (shape := _shape(kind, error["loc"])):
        return FieldError(path, f"must be {shape}")
    return FieldError(path, _REASONS.get(error["type"]) or error["msg"].replace("Input should be", "must be"))


def _shape(kind: str, loc: tuple[Any, ...]) -> str | None:
    """What the field at ``loc`` must be, in words, if its model says (its description)."""
    leaf = next((part for part in reversed(loc) if isinstance(part, str) and part in _FIELDS), None)
    field = REQUESTS[kind].model_fields.get(leaf or "") or Message.model_fields.get(leaf or "")
    return field.description if field is not None else None


def _path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELDS:
            path += f".{part}" if path else part
    return path


_SHAPE_ERRORS = ("missing", "string_type", "list_type", "too_short", "string_too_short")
_REASONS = {"missing": "is required", "model_type": "must be an object", "dict_type": "must be an object",
            "string_type": "must be a string", "int_type": "must be an integer", "bool_type": "must be true or false",
            "list_type": "must be a list", "too_short": "must not be empty", "string_too_short": "must not be empty"}


# ---------------------------------------------------------------------------- OpenAPI


def _error_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def openapi(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 description of the gateway's routes."""
    _, top = models_json_schema([(model, "validation") for model in REQUESTS.values()],
                                ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = {**top.get("$defs", {}), "Error": _error_schema()}
    json_body = {"type": "object"}
    errors = {str(status): {"description": what, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for status, what in (
        (400, "a field the route cannot take, named in error.param"), (401, "no token, or not a valid one"),
        (402, "a budget refuses the call"), (403, "the token lacks the route's scope"),
        (404, "no registered provider serves the model"), (413, "the body is larger than --max-body"),
        (429, "the token's rate limit (Retry-After)"), (502, "the provider failed; the call was not billed"),
        (500, "the gateway failed; the call was not billed and its hold was released"),
        (504, "the provider did not answer in time"))}
    paths: dict[str, Any] = {}
    for path, kind, summary in (("/v1/chat/completions", "chat", "Chat Completions (streaming too)"),
                                ("/v1/embeddings", "embeddings", "Embeddings"),
                                ("/v1/responses", "responses", "Responses"),
                                ("/v1/messages", "messages", "Anthropic's Messages API")):
        answer: dict[str, Any] = {"application/json": {"schema": json_body}}
        if kind != "embeddings":
            answer["text/event-stream"] = {"schema": {"type": "string"}}
        paths[path] = {"post": {
            "operationId": kind, "summary": summary, "security": [{"token": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{REQUESTS[kind].__name__}"}}}},
            "responses": {"200": {"description": "the provider's answer, as sent", "content": answer}, **errors}}}
    paths["/v1/models"] = {"get": {
        "operationId": "models", "summary": "The models the registered providers serve", "security": [{"token": []}],
        "responses": {"200": {"description": "OpenAI's model list", "content": {"application/json": {
            "schema": json_body}}}, **{s: errors[s] for s in ("401", "403")}}}}
    paths["/v1/traces"] = {"post": {
        "operationId": "traces", "summary": "OTLP/HTTP traces: GenAI spans become usage events",
        "security": [{"token": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": json_body},
                                                      "application/x-protobuf": {"schema": {"type": "string",
                                                                                            "format": "binary"}}}},
        "responses": {"200": {"description": "ExportTraceServiceResponse, in the request's media type",
                              "content": {"application/json": {"schema": json_body}}},
                      **{s: errors[s] for s in ("400", "401", "403", "413")},
                      "415": {"description": "a content type other than JSON or protobuf"}}}}
    paths["/healthz"] = {"get": {"operationId": "healthz", "summary": "The gateway is serving", "responses": {
        "200": {"description": "status, gateway id, calls under way", "content": {"application/json": {
            "schema": json_body}}}}}}
    paths["/openapi.json"] = {"get": {"operationId": "openapi", "summary": "This description", "responses": {
        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": json_body}}}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "Budgeteer gateway", "version": version,
                     "description": "The OpenAI (and Anthropic Messages) HTTP API in front of the registered "
                                    "providers, every call governed. Errors take OpenAI's shape "
                                    "(Anthropic's on /v1/messages)."},
            "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": {"token": {
                "type": "http", "scheme": "bearer", "description": "a Budgeteer token, bgt_..."}}}}
