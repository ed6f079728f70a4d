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


def load_tokenizer(name: str) -> Tokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: only 'byte' (mock engine) is available in this build")
