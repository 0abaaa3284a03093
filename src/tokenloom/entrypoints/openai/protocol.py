"""Request bodies of the OpenAI-compatible API (pydantic v2).

Every model forbids unknown fields, so a field we do not implement is a 400
naming it rather than silently ignored. OpenAI fields we know but do not
support are listed in ``UNSUPPORTED_FIELDS`` with the reason the error gives;
sending one of them as ``null`` (what some clients do for "not set") is allowed.

Optional fields default to ``None`` meaning "not given"; the serving layer
applies the defaults, so ``null`` and absence mean the same thing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenloom.sampling_params import InvalidParameter

MAX_TOP_LOGPROBS = 20
MAX_N = 128

_LEGACY_FUNCTIONS = "the deprecated functions API is not supported; send tools and tool_choice"
_CACHE_ROUTING = "prompt cache routing is not supported (prefix caching is automatic)"
UNSUPPORTED_FIELDS: dict[str, str] = {
    "functions": _LEGACY_FUNCTIONS, "function_call": _LEGACY_FUNCTIONS,
    "audio": "only text output is supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "store": "stored completions are not supported", "metadata": "stored completions are not supported",
    "service_tier": "service tiers are not supported",
    "reasoning_effort": "reasoning controls are not supported", "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "prompt_cache_key": _CACHE_ROUTING, "prompt_cache_retention": _CACHE_ROUTING,
    "prompt_cache_options": _CACHE_ROUTING,
    "suffix": "insertion (suffix) is not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in UNSUPPORTED_FIELDS)}
        return data


class StreamOptions(_Strict):
    include_usage: bool | None = None


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced; strict only documents intent


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise InvalidParameter("json_schema", "is required with type 'json_schema' and allowed "
                                                  "with no other type")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one kind (checked by StructuredOutputsParams)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(_Strict):
    """What chat and completions share: OpenAI's sampling fields plus vLLM's extras."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # structured output: OpenAI's response_format, vLLM's structured_outputs
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options", "is only allowed when stream is true")
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise InvalidParameter("structured_outputs", "and response_format both constrain the output; "
                                                         "send one of them")
        return self


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments are always held to the schema when a call is forced


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    """A conversation turn. ``developer`` is OpenAI's newer name for ``system``; an
    assistant turn may call tools (content null), a ``tool`` turn answers a call."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _role_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise InvalidParameter("tool_calls", "is only allowed on assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise InvalidParameter("tool_call_id", "is required on tool messages and allowed on no others")
        if self.content is None and not self.tool_calls:
            raise InvalidParameter("content", "is required (null only on an assistant message with tool_calls)")
        return self

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: Any) -> str | list[dict[str, str]] | None:
        if content is None or isinstance(content, str):
            return content
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "text"
            and isinstance(p["text"], str) for p in content)
        if not parts_ok:
            raise ValueError("must be a string or a list of {'type': 'text', 'text': ...} parts "
                             "(only text input is supported)")
        return content

    def template_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParameter("top_logprobs", "requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidParameter("max_tokens", "and max_completion_tokens disagree; send one of them")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidParameter("tool_choice", "needs tools")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidParameter("tools", "function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidParameter("tool_choice", f"names the function {self.tool_choice.function.name!r}, "
                                                  "which is not in tools")
        if self.forces_tool_call and (self.structured_outputs is not None or (
                self.response_format is not None and self.response_format.type != "text")):
            raise InvalidParameter("tool_choice", "forces a tool call, which cannot be combined with "
                                                  "response_format or structured_outputs")

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Any
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return prompt
            if all(_is_token_id(t) for t in prompt):
                return prompt
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
                return prompt
        raise ValueError("must be a string, a non-empty list of strings, a list of token ids "
                         "or a list of lists of token ids")

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        # We return every sample we generate; best_of > n would need ranking we do not do.
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidParameter("best_of", "other than n is not supported (every sample is returned)")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (text or token ids)."""
        if isinstance(self.prompt, str) or _is_token_id(self.prompt[0]):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParameter("prompt", "and messages: send exactly one of them")
        if self.messages is None and self.add_generation_prompt is not None:
            raise InvalidParameter("add_generation_prompt", "applies to messages only")
        if self.messages is not None and self.add_special_tokens is not None:
            raise InvalidParameter("add_special_tokens", "applies to prompt only")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
