"""Request bodies of the OpenAI API subset the router serves (chat and text completions).

Unknown fields are ignored, as OpenAI and vLLM do, so clients that send `logprobs`, `presence_penalty`,
`tools` and the like still get an answer. Numbers and flags are strict (no "5" for 5, no true for 1):
OpenAI rejects those too, and silently coercing them hides client bugs.

The union-typed fields (`content`, `prompt`, `stop`) are checked by a before-validator that raises one
readable error; otherwise pydantic reports one error per union member, under locations like
`prompt.list[int].0`, which say nothing useful to a client.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import AfterValidator, field_validator
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4
MAX_TOKEN_ID = 2**31  # exclusive; token ids travel as int32 in every engine we plug into

PositiveInt = Annotated[StrictInt, Field(gt=0)]
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=2.0)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]

PROMPT_SHAPE = "a string, a list of one string, or a list of token ids"
SEVERAL_PROMPTS = "n>1 / several prompts not supported: send one prompt per request"


def _invalid(error_type: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(error_type, message)


def _encodable(value: str) -> str:
    """JSON may carry lone surrogates ("\\ud800") that no UTF-8 text can hold: no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _invalid("invalid_text", f"text that cannot be encoded as UTF-8 (a lone surrogate "
                                       f"{value[e.start]!a} at character {e.start}); send valid Unicode text")
    return value


Text = Annotated[StrictStr, AfterValidator(_encodable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    # None is how clients replay an assistant turn that only made tool calls; it reads as "".
    content: StrictStr | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value if value is None else _encodable(value)
        if not isinstance(value, list):
            raise _invalid("invalid_content", "content must be a string or a list of text parts")
        for part in value:
            if not isinstance(part, dict):
                raise _invalid("invalid_content", "each content part must be an object")
            if part.get("type") != "text":
                raise _invalid(
                    "unsupported_content",
                    f"content parts of type {part.get('type')!r} are not supported: only 'text' parts are",
                )
            if not isinstance(part.get("text"), str):
                raise _invalid("invalid_content", "a text content part needs a string 'text'")
            _encodable(part["text"])
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # vLLM joins text parts the same way


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = False


class _SamplingFields(BaseModel):
    """Fields chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: Text
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="up to 4 stop strings")
    n: StrictInt | None = Field(default=1, description="only 1 is supported")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    ignore_eos: StrictBool | None = Field(default=False, description="vLLM's extension: generate max_tokens "
                                          "tokens even past the end-of-sequence token (benchmarks use it)")

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("invalid_stop", "stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise _invalid("invalid_stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise _invalid("invalid_stop", "stop strings must not be empty")
        for stop in stops:
            _encodable(stop)
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = Field(
        default=None, description="takes precedence over max_tokens when both are given"
    )

    @field_validator("messages", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise _invalid("empty_messages", "messages must contain at least one message")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=PROMPT_SHAPE
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _encodable(value)
        if not isinstance(value, list):
            raise _invalid("invalid_prompt", f"prompt must be {PROMPT_SHAPE}")
        if not value:
            raise _invalid("empty_prompt", "prompt must not be empty")
        if all(isinstance(p, str) for p in value) or all(isinstance(p, list) for p in value):
            if len(value) > 1:
                raise _invalid("several_prompts", SEVERAL_PROMPTS)
            if isinstance(value[0], list):
                _check_token_ids(value[0])
            else:
                _encodable(value[0])
            return value
        _check_token_ids(value)
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        first = prompt[0]
        if isinstance(first, (str, list)):
            return first
        return list(prompt)  # type: ignore[arg-type]


def _check_token_ids(ids: list[Any]) -> None:
    for token_id in ids:
        # bool is an int subclass; a JSON true is never a token id
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise _invalid("invalid_prompt", f"prompt must be {PROMPT_SHAPE}")
        if not 0 <= token_id < MAX_TOKEN_ID:
            raise _invalid("invalid_token_id", f"prompt token id {token_id} is outside [0, 2**31)")


@dataclass(frozen=True)
class Format:
    """What differs between chat and text completions on the wire."""

    object: str
    chunk_object: str
    prompt_word: str  # names the prompt in error messages and in `param`
    chat: bool

    def opening(self) -> list[dict]:
        return [choice(delta={"role": "assistant", "content": ""})] if self.chat else []

    def delta_choices(self, text: str, finish_reason: str | None) -> list[dict]:
        if not self.chat:
            return [choice(text=text, finish_reason=finish_reason)] if text or finish_reason else []
        choices = [choice(delta={"content": text})] if text else []
        if finish_reason is not None:
            choices.append(choice(delta={}, finish_reason=finish_reason))
        return choices

    def full_choice(self, text: str, finish_reason: str) -> dict:
        if self.chat:
            return choice(message={"role": "assistant", "content": text}, finish_reason=finish_reason)
        return choice(text=text, finish_reason=finish_reason)


CHAT = Format("chat.completion", "chat.completion.chunk", "messages", chat=True)
COMPLETION = Format("text_completion", "text_completion", "prompt", chat=False)


def choice(*, finish_reason: str | None = None, **content: Any) -> dict:
    return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
