"""Tokenizers the router uses to template and count prompts.

The mock engine's model uses `ByteTokenizer` (token id = UTF-8 byte), so tests can predict everything.
Real models load their Hugging Face tokenizer (added with the vLLM engine).
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Messages ({"role", "content"}) to the prompt text, ending with the assistant's turn."""
        ...


class ByteTokenizer:
    """Token id = one UTF-8 byte; a fixed, documented chat template."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        turns = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return turns + "<|assistant|>"


class HFTokenizer:
    """A Hugging Face tokenizer from a local model directory, with the model's own chat template."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # installed with the vllm extra

        self._tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        # The chat template already carries its special tokens; plain prompts get the model's defaults
        # from the template-free path in vLLM, which adds none for the models we ship.
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def load_tokenizer(name: str) -> Tokenizer:
    """'byte' for the mock engine, else a local Hugging Face model directory."""
    if name == "byte":
        return ByteTokenizer()
    try:
        return HFTokenizer(name)
    except ImportError as e:
        raise ValueError(f"tokenizer {name!r} needs transformers: pip install -e '.[cpu]'") from e
    except OSError as e:
        raise ValueError(f"cannot load the tokenizer from {name!r} ({e}); is the model directory on this machine?") from e
