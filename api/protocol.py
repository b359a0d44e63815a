"""The OpenAI wire format, in one place: every request and reply body of chat completions and the
legacy completions as typed msgspec Structs (decoding checks types and ranges; api/validation.py
adds the rules a type cannot say), plus the few derived values a request hands the engine.
The Responses API and tokenize bodies are declared beside their routes (api/responses.py,
api/tokenize.py): each is used by that route alone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from llama_jax.request import MAX_CHOICES, MAX_STOP_STRINGS, SamplingOptions
from llama_jax.sampling import MAX_BIAS, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from llama_jax.tools import ToolSpec

MAX_STOP_TOKEN_IDS = 32  # a request's own stop_token_ids (the engine's limit, EOS ids included, is 64)
MAX_LOGPROBS = 5  # the legacy API's `logprobs` is at most 5

# ------------------------------------------------------------------------------------ requests

class FunctionCall(Struct):
    name: str
    arguments: str = ""


class ToolCall(Struct):
    function: FunctionCall
    id: str | None = None
    type: Literal["function"] = "function"


class Message(Struct, kw_only=True):
    """One conversation message. Content: a string, a list of {"type": "text", "text": ...} parts,
    or null for an assistant message that only carries tool_calls."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant only
    tool_call_id: str | None = None  # tool only (required there)


Name = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -, at most 64")]


class FunctionDef(Struct, kw_only=True):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object; omitted: no arguments
    strict: bool | None = None  # accepted; arguments always follow the schema here


class Tool(Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class FunctionName(Struct):
    name: str


class ToolChoiceFunction(Struct):
    function: FunctionName
    type: Literal["function"] = "function"


class JsonSchemaFormat(Struct, kw_only=True):
    name: Name
    schema: dict[str, Any] | None = None  # omitted: any JSON object
    description: str | None = None
    strict: bool | None = None  # accepted; the output always validates here


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


SPECULATIVE_DOC = ("prompt-lookup speculative decoding for this request (the same output up to rounding, often "
                   "faster when the reply copies the prompt); default: the server's --speculative-ngram setting; "
                   "true on a server without it is a 400")


def _doc(description: str, **constraints: Any) -> Meta:
    return Meta(description=description, **constraints)


Unit = Annotated[float, _doc("in [0, 1]", ge=0, le=1)]
Penalty = Annotated[float, _doc("in [-2, 2]; default 0", ge=-2, le=2)]
MaxTokens = Annotated[int, _doc("1 <= max_tokens <= 1000000; default: the rest of the context", ge=1, le=1_000_000)]
Bias = Annotated[float, Meta(ge=-MAX_BIAS, le=MAX_BIAS)]
Choices = Annotated[list[str], _doc("the output is exactly one of these", min_length=1, max_length=256)]
JsonSchemaText = Annotated[dict[str, Any] | str, _doc("a JSON schema (an object, or its JSON text)")]


class StructuredOutputs(Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs`: one constraint on the output (api/guided.py compiles it)."""

    json: JsonSchemaText | None = None
    regex: Annotated[str, _doc("the output fully matches this regex (Rust syntax)")] | None = None
    choice: Choices | None = None
    grammar: Annotated[str, _doc("the output is in this Lark grammar's language (llguidance's dialect)")] | None = None
    json_object: Annotated[bool, _doc("true: any JSON object")] | None = None
    disable_any_whitespace: Annotated[bool, _doc("accepted: JSON output never has free whitespace here")] | None = None
    disable_fallback: Annotated[bool, _doc("accepted: there is no fallback backend")] | None = None
    whitespace_pattern: Annotated[str, _doc("refused with a 400 (unsupported)")] | None = None
    structural_tag: Annotated[Any, _doc("refused with a 400 (unsupported)")] | None = None


class GuidedFields(Struct, kw_only=True):
    """The structured-output extensions of chat and completions requests (vLLM's names)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: Annotated[JsonSchemaText, _doc("older name of structured_outputs.json")] | None = None
    guided_regex: Annotated[str, _doc("older name of structured_outputs.regex")] | None = None
    guided_choice: Annotated[Choices, _doc("older name of structured_outputs.choice")] | None = None
    guided_grammar: Annotated[str, _doc("older name of structured_outputs.grammar")] | None = None



class SamplingFields(GuidedFields, kw_only=True):
    """The fields chat and legacy completions share: streaming, sampling, stops, vLLM's extensions."""

    stream: Annotated[bool, _doc("stream chat.completion.chunk events over SSE; default false")] | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, _doc("0 <= temperature <= 2; default 1; 0 is greedy", ge=0, le=2)] | None = None
    top_p: Annotated[float, _doc("0 < top_p <= 1; default 1", gt=0, le=1)] | None = None
    min_p: Annotated[Unit, _doc("0 <= min_p <= 1; default 0 (off)")] | None = None
    top_k: Annotated[int, _doc("0 <= top_k < 1000; default 0 (off)", ge=0, lt=1000)] | None = None
    stop: str | Annotated[list[str], _doc("up to 16 non-empty stop strings", max_length=MAX_STOP_STRINGS)] | None = None
    n: Annotated[int, _doc(f"1 <= n <= {MAX_CHOICES}; default 1 (choices beyond the free slots wait for theirs)",
                           ge=1, le=MAX_CHOICES)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, _doc("0.01 <= repetition_penalty <= 5; default 1", ge=0.01, le=5)] | None = None
    user: Annotated[str, _doc("end-user id; informational")] | None = None
    seed: Annotated[int, _doc("0 <= seed < 2^63; default: random", ge=0, le=2**63 - 1)] | None = None
    logit_bias: Annotated[dict[str, Bias],
                          _doc(f"token id (a string of digits) -> bias in [-100, 100] added to its logit; "
                               f"at most {MAX_LOGIT_BIAS} tokens", max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: Annotated[int, _doc("vLLM's: no stop token (EOS included) and no stop string ends a choice before "
                                    "this many tokens; default 0", ge=0, le=1_000_000)] | None = None
    ignore_eos: Annotated[bool, _doc("vLLM's: the model's end-of-sequence tokens do not stop generation; "
                                     "default false")] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Meta(ge=0)]],
                              _doc(f"vLLM's: token ids that also end a choice (the token is not returned as text); "
                                   f"at most {MAX_STOP_TOKEN_IDS}", max_length=MAX_STOP_TOKEN_IDS)] | None = None
    speculative: Annotated[bool, _doc(SPECULATIVE_DOC)] | None = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings, whether given as one string or a list."""
        return tuple([self.stop] if isinstance(self.stop, str) else self.stop or ())

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_options(self) -> SamplingOptions:
        """The sampling fields, defaults for nulls."""
        defaults = SamplingOptions()
        return SamplingOptions(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            repetition_penalty=defaults.repetition_penalty if self.repetition_penalty is None
            else self.repetition_penalty,
            presence_penalty=defaults.presence_penalty if self.presence_penalty is None else self.presence_penalty,
            frequency_penalty=defaults.frequency_penalty if self.frequency_penalty is None else self.frequency_penalty,
            seed=self.seed,
            logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
        )

    def stop_ids(self, eos_ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """The engine's stop ids, as vLLM counts them: the model's EOS ids unless `ignore_eos`, plus
        `stop_token_ids`; None when that is just the EOS ids."""
        if not self.ignore_eos and not self.stop_token_ids:
            return None
        return tuple(sorted({*(() if self.ignore_eos else eos_ids), *(self.stop_token_ids or ())}))


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/chat/completions (alias /v1/openai/chat/completions). null means the default."""

    model: Annotated[str, _doc("model name; this server serves exactly one")]
    messages: Annotated[list[Message], _doc("conversation: (user, assistant, tool)*, user, with system messages anywhere",
                                            min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: Annotated[MaxTokens, _doc("alias of max_tokens")] | None = None
    tools: Annotated[list[Tool], _doc("function tools; calls follow their parameter schemas")] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: Annotated[bool, _doc("allow several tool calls in one reply; default true")] | None = None
    response_format: Annotated[ResponseFormat,
                               _doc("text, json_object or json_schema (output valid by construction)")] | None = None
    logprobs: Annotated[bool, _doc("return the logprob of every generated token")] | None = None
    top_logprobs: Annotated[int, _doc("0..20 alternatives per token; needs logprobs: true",
                                      ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    functions: Annotated[Any, _doc("legacy; refused with a 400: use tools")] | None = None
    function_call: Annotated[Any, _doc("legacy; refused with a 400: use tool_choice")] | None = None

    def max_new_tokens(self) -> int | None:
        """`max_tokens` or its alias `max_completion_tokens` (None: the rest of the context)."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required", the forced function's name or None). No tools: "none";
        tools without tool_choice: "auto" (OpenAI's defaults); a named function: ("required", name)."""
        if not self.tools or self.tool_choice == "none":
            return "none", None
        if isinstance(self.tool_choice, ToolChoiceFunction):
            return "required", self.tool_choice.function.name
        return self.tool_choice or "auto", None

    def tool_specs(self) -> list[ToolSpec]:
        return [ToolSpec(t.function.name, t.function.description, t.function.parameters) for t in self.tools or ()]


class CompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/completions (alias /v1/openai/completions). null means the default."""

    model: str
    prompt: str | list[Any]  # the list forms are checked by `prompt_items` (msgspec unions hold one array type)
    max_tokens: Annotated[int, Meta(ge=0, le=1_000_000, description="default 16; 0 only with echo")] | None = None
    echo: Annotated[bool, Meta(description="return the prompt before the completion")] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS, description="0..5 alternatives per token")] | None = None
    best_of: int | None = None
    suffix: str | None = None


# ------------------------------------------------------------------------------------ replies

class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ContentLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[ContentLogprob] | None


class FunctionCallOut(Struct):
    name: str
    arguments: str  # a JSON object as a string, valid against the function's parameters


class ToolCallOut(Struct):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(Struct, omit_defaults=True):
    role: str
    content: str | None  # null when the reply is tool calls
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class Choice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose keys the prefix cache held (not prefilled again)


class CompletionTokensDetails(Struct):
    """OpenAI's counts for predicted outputs, here of speculative drafts: accepted and rejected."""

    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated_cost: float
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | UnsetType = UNSET  # only when drafts were verified


class ChatCompletion(Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunction(Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class DeltaToolCall(Struct, omit_defaults=True):
    """A streamed tool call: first index, id, type and name (arguments ""), then argument fragments."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: DeltaFunction | UnsetType = UNSET


class Delta(Struct, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, omit_defaults=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None | UnsetType = UNSET  # only with stream_options.include_usage: null, then the totals


class ErrorDetail(Struct):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(Struct):
    """Every non-2xx body (and a mid-stream `data:` error event)."""

    error: ErrorDetail


class Model(Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Struct):
    object: Literal["list"]
    data: list[Model]



class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for the first prompt token
    top_logprobs: list[dict[str, float] | None]  # the `logprobs` likeliest tokens at each position
    text_offset: list[int]  # where each token's text starts in the choice's `text`


class CompletionChoice(Struct):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TextCompletion(Struct, omit_defaults=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET  # streams: only with stream_options.include_usage
