"""EngineClient: what a server holds of an engine. One async stream of deltas per request.

Two kinds, one surface:

    AsyncLLMEngine    the engine loop in a thread of this process (tests, embedding)
    EngineCoreClient  the engine loop in its own process (``tokenloom serve``)

Requests are checked and tokenized on the caller's side (``InputProcessor``), so
a bad request fails there, before any output, and never reaches the engine loop.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from tokenloom.engine.input_processor import InputProcessor, PreparedRequest
from tokenloom.engine.stats import EngineStats
from tokenloom.engine.tokenizer import Tokenizer
from tokenloom.request import RequestOutput
from tokenloom.sampling_params import SamplingParams
from tokenloom.structured import StructuredOutputManager


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


class StatsSource(Protocol):
    def snapshot(self) -> EngineStats: ...


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Client -> engine loop: run this request."""

    prepared: PreparedRequest


@dataclass(frozen=True, slots=True)
class AbortRequest:
    """Client -> engine loop: stop this request and free its blocks."""

    request_id: str


@dataclass(slots=True)
class RequestStream:
    """Where one request's deltas go: a queue on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prepared: PreparedRequest


class EngineClient(ABC):
    """``generate`` yields RequestOutput deltas; leaving the iterator early (client
    disconnect, cancellation) aborts the request and frees its KV blocks at the
    engine loop's next turn."""

    tokenizer: Tokenizer
    structured: StructuredOutputManager  # compiles on the caller's side: a bad grammar is a 400
    inputs: InputProcessor
    stats: StatsSource
    model_path: str
    error: BaseException | None
    last_step_time: float  # time.monotonic() of the engine loop's last turn

    def __init__(self) -> None:
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.inputs.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def start(self) -> None:
        """Start serving (on the event loop that will call ``generate``)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the engine loop (and the engine) for good."""

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def _submit(self, prepared: PreparedRequest) -> None:
        """Hand a registered request to the engine loop."""

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validation errors (ValueError) are raised here, before any output."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running") from self.error
        prepared = self.inputs.prepare(request_id, prompt, params)
        if params.structured_outputs is not None:
            # Compiled on the grammar pool (usually a cache hit: the server compiles first);
            # one that does not compile raises GrammarCompileError, an InvalidParameter.
            await asyncio.wrap_future(self.structured.compile(params.structured_outputs))
        stream = RequestStream(asyncio.get_running_loop(), asyncio.Queue(), prepared)
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._submit(prepared)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _stream(self, request_id: str) -> RequestStream | None:
        with self._streams_lock:
            return self._streams.get(request_id)

    def _all_streams(self) -> list[RequestStream]:
        with self._streams_lock:
            return list(self._streams.values())
