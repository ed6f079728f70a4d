"""An OpenAI request body -> one GenerateRequest: the model looked up once (aliases included), the chat template
applied, the prompt tokenized, the context limit enforced, the sampling parameters and the deadline set."""

from __future__ import annotations

import re
import time

from starlette.requests import Request

from pdserve.protocol import SamplingParams
from pdserve.tokenizer import Tokenizer
from services.router.backend import Backend, GenerateRequest
from services.router.errors import ContextLengthExceeded, InvalidRequest
from services.router.models import ServedModels
from services.router.openai_types import SEVERAL_PROMPTS, ChatCompletionRequest, CompletionRequest, Format

# vLLM defaults max_tokens to all the context left after the prompt; we cap that default so a request
# without max_tokens ends in bounded time on a CPU engine. An explicit max_tokens is honoured up to the limit.
DEFAULT_MAX_TOKENS = 256

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def build_request(request: Request, request_id: str, client_request_id: str | None,
                   body: ChatCompletionRequest | CompletionRequest, fmt: Format, models: ServedModels, backend: Backend,
                   request_timeout_s: float) -> GenerateRequest:
    if body.n not in (None, 1):
        raise InvalidRequest(f"n={body.n}: {SEVERAL_PROMPTS}", param="n")
    card = models.resolve(body.model)
    tokenizer = backend.tokenizer(card.name)
    if isinstance(body, ChatCompletionRequest):
        prompt_token_ids = _chat_prompt(tokenizer, body)
    else:
        prompt_token_ids = _completion_prompt(tokenizer, body)
    if not prompt_token_ids:
        raise InvalidRequest(f"The {fmt.prompt_word} must not be empty.", param=fmt.prompt_word)
    sampling = SamplingParams(
        max_tokens=_max_tokens(body.requested_max_tokens(), len(prompt_token_ids), card.max_model_len, fmt),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=bool(body.ignore_eos),
    )
    traceparent = request.headers.get("traceparent")
    return GenerateRequest(
        request_id=request_id,
        client_request_id=client_request_id,
        model=card.name,
        prompt_token_ids=tuple(prompt_token_ids),
        sampling=sampling,
        deadline=time.time() + request_timeout_s,
        # W3C trace context: a malformed traceparent is ignored, not an error
        traceparent=traceparent if traceparent and _TRACEPARENT.fullmatch(traceparent) else None,
    )


def _chat_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages)
    except Exception as e:
        # Templates reject conversations they cannot render (roles out of order, unknown roles): bad input.
        raise InvalidRequest(f"The model's chat template rejected these messages: {e}", param="messages") from e
    return tokenizer.encode(text)


def _completion_prompt(tokenizer: Tokenizer, body: CompletionRequest) -> list[int]:
    prompt = body.prompt_text_or_ids()
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    vocab_size = getattr(tokenizer, "vocab_size", None)  # not in the Tokenizer protocol; checked where known
    for token_id in prompt if isinstance(vocab_size, int) else ():
        if token_id >= vocab_size:
            raise InvalidRequest(
                f"Prompt token id {token_id} is out of range: the model's vocabulary has {vocab_size} tokens.",
                param="prompt",
            )
    return prompt


def _max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, fmt: Format) -> int:
    remaining = max_model_len - num_prompt_tokens
    if requested is None:
        if remaining <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_model_len} tokens. However, your {fmt.prompt_word} "
                f"resulted in {num_prompt_tokens} tokens, which leaves no room for the completion. "
                f"Please reduce the length of the {fmt.prompt_word}.",
                param=fmt.prompt_word,
            )
        return min(DEFAULT_MAX_TOKENS, remaining)
    if requested > remaining:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {fmt.prompt_word}, {requested} in "
            f"the completion). Please reduce the length of the {fmt.prompt_word} or completion.",
            param=fmt.prompt_word,
        )
    return requested
