"""``tokenloom chat``: a terminal conversation with streaming output.

The engine runs in this process (no server needed). Each turn renders the
whole history with the model's chat template and streams the reply token by
token. Ctrl-C during a reply stops it (the turn is dropped); ``/reset``
clears the history; ``/exit`` or Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import signal
import sys
import threading
from typing import TextIO

from tokenloom.config import EngineConfig
from tokenloom.engine.chat_template import ChatTemplateError
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.sampling_params import SamplingParams

PROMPT = ">>> "
HELP = "Type a message. /reset clears the conversation, /exit quits."


class ChatSession:
    """The history of one conversation and the engine that continues it."""

    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.start = [{"role": "system", "content": system}] if system else []
        self.history = list(self.start)
        self._ids = itertools.count()

    def reset(self) -> None:
        self.history = list(self.start)

    def reply(self, text: str, out: TextIO) -> str | None:
        """Stream the answer to ``text`` into ``out``; None when it could not be produced."""
        conversation = [*self.history, {"role": "user", "content": text}]
        try:
            prompt_ids = self.engine.tokenizer.encode_chat(conversation)
        except ChatTemplateError as exc:
            out.write(f"[error: {exc}]\n")
            return None
        room = self.engine.max_model_len - len(prompt_ids)
        if room < 1:
            out.write(f"[the conversation is {len(prompt_ids)} tokens, the context holds "
                      f"{self.engine.max_model_len}; /reset to start over]\n")
            return None
        request_id = f"chat-{next(self._ids)}"
        max_tokens = min(self.params.max_tokens or room, room)
        self.engine.add_request(request_id, prompt_ids, _with_max_tokens(self.params, max_tokens))
        answer = self._stream(request_id, out)
        if answer is not None:
            self.history = [*conversation, {"role": "assistant", "content": answer}]
        return answer

    def _stream(self, request_id: str, out: TextIO) -> str | None:
        # Ctrl-C only raises a flag, checked between steps, so that it never lands
        # in the middle of a step and leaves the scheduler half-updated.
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
        parts: list[str] = []
        try:
            while self.engine.has_unfinished_requests() and not interrupted.is_set():
                for delta in self.engine.step():
                    parts.append(delta.outputs[0].text)
                    out.write(delta.outputs[0].text)
                    out.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupted.is_set():
            self.engine.abort_request(request_id)
            out.write("\n[stopped]\n")
            return None
        out.write("\n")
        return "".join(parts)


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=max_tokens)


def run_chat(config: EngineConfig, args: argparse.Namespace) -> int:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    try:
        params.validate()
    except ValueError as exc:
        print(f"tokenloom chat: {exc}", file=sys.stderr)
        return 2
    session = ChatSession(LLMEngine(config), params, args.system)
    print(HELP)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset()
            print("[conversation cleared]")
        elif command:
            session.reply(line, sys.stdout)
