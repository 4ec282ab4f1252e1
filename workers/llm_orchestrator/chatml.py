"""The ChatML prompt (SmolLM2's chat template), built on the client so a reply can be continued.

The chat API cannot continue a reply: a conversation ending with an assistant message is closed by
the server's template (`<|im_end|>`, then a new `<|im_start|>assistant`), so the model would start
a second answer. `/v1/completions` with the template applied here can: the prompt ends inside the
assistant's turn, after the text generated so far, and the model goes on from there. The text
matches SmolLM2's template (`tokenizer.chat_template` in its GGUF) when the first message is the
system message, which the orchestrator always sends."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

END = "<|im_end|>"  # ends a turn; the model's end-of-sequence token
STOP = [END, "<|im_start|>"]  # a completion never runs into a next turn


def prompt(messages: Iterable[Mapping[str, str]], reply_so_far: str = "") -> str:
    """The conversation as ChatML, opened for the assistant's reply and continuing `reply_so_far`."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}{END}\n" for m in messages)
    return f"{turns}<|im_start|>assistant\n{reply_so_far}"
