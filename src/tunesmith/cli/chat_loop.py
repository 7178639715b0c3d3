"""`tunesmith chat`: an interactive conversation with a chat run, the reply streamed to the terminal as it is
generated. The history is kept (the oldest turns are dropped when it outgrows the model's length; the system
prompt stays); `/reset` starts over, `/system TEXT` sets the system prompt, `/exit` (or Ctrl-D) leaves; Ctrl-C
while a reply is generated stops that reply."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit (or Ctrl-D)"


class _TerminalStreamer:
    """A transformers streamer that writes decoded text as it arrives (TextStreamer's word-boundary buffering,
    so multi-byte characters and BPE pieces print whole), skipping the prompt."""

    def __init__(self, tokenizer, stream: TextIO):
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                stream.write(text + ("\n" if stream_end else ""))
                stream.flush()

        self.inner = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(loaded, read: Callable[[str], str], stream: TextIO, system: str | None = None, **settings) -> list[dict]:
    """The chat loop over `read` (input(), or a test's lines); returns the final history."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    stream.write(f"chatting with {loaded.run_dir} ({HELP})\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            stream.write("\n")
            return history
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return history
        if command == "/reset":
            history = [turn for turn in history if turn["role"] == "system"]
            stream.write("(conversation cleared)\n")
            continue
        if command == "/system":
            history = [{"role": "system", "content": rest.strip()}] + [t for t in history if t["role"] != "system"]
            stream.write("(system prompt set)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        stream.write("assistant> ")
        stream.flush()
        try:
            reply = loaded.chat(history, streamer=_TerminalStreamer(loaded.tokenizer, stream).inner, **settings)
        except KeyboardInterrupt:
            stream.write("\n(stopped)\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
