"""AsyncLLMEngine: the engine loop in its own thread, one async stream per request.

::

    event loop (HTTP, tokenization)          engine thread
    ------------------------------           -------------------------------
    generate() --prepare (validate)-->       inbox: admit / abort
         ^                                   step() -> RequestOutput deltas
         +------ asyncio.Queue <-- call_soon_threadsafe --+

Only the engine thread touches scheduler and KV state; the event loop only
validates and tokenizes (``prepare_request``), so a bad request fails on the
caller's side and never reaches the loop. Model compute runs in the thread,
so the event loop stays responsive while a step is running.

``start()`` runs the loop in a new thread; ``run_in_current_thread()`` runs it
on the caller's, which the server uses to keep the engine on the process's
main thread: OpenMP-parallel ops (the native kernels among them) issued from a
secondary thread ran about 2x slower on a 2-core machine (measured: docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenloom.engine.llm_engine import LLMEngine, PreparedRequest
from tokenloom.request import RequestOutput
from tokenloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


@dataclass(frozen=True, slots=True)
class _Admit:
    prepared: PreparedRequest


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    """Background-stepped engine. ``generate`` yields RequestOutput deltas; leaving the
    iterator early (client disconnect, cancellation) aborts the request and frees its
    KV blocks at the engine's next loop turn."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Admit | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._idle_wait_s = idle_wait_s
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop_done = threading.Event()
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a new thread (a no-op when a thread already runs it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)
            self._thread.start()

    def claim_current_thread(self) -> None:
        """Reserve the calling thread for the loop (``start()`` then does nothing);
        ``run_in_current_thread()`` on it runs the loop."""
        if self._thread is not None:
            raise RuntimeError("the engine loop already has a thread")
        self._thread = threading.current_thread()

    def run_in_current_thread(self) -> None:
        """Run the loop on the calling thread until ``shutdown()`` (or KeyboardInterrupt)."""
        if self._thread is None:
            self.claim_current_thread()
        elif self._thread is not threading.current_thread():
            raise RuntimeError("the engine loop belongs to another thread")
        self._run()

    def shutdown(self) -> None:
        """Stop the loop, then the engine (its tensor-parallel ranks, where it has them)."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._loop_done.wait(timeout=30)
        self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self.error is None
                and not self._loop_done.is_set())

    # -- requests --------------------------------------------------------------

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Validation errors (ValueError) are raised here, before any output."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running") from self.error
        prepared = self.engine.prepare_request(request_id, prompt, params)
        if params.structured_outputs is not None:
            # Compiled on the grammar pool (usually a cache hit: the server compiles first);
            # one that does not compile raises GrammarCompileError, an InvalidParameter.
            await asyncio.wrap_future(self.engine.structured.compile(params.structured_outputs))
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        self._inbox.put(_Admit(prepared))
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
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # -- the engine thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._loop_done.set()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self.engine.check_health()  # a dead tensor-parallel rank fails the loop within a turn
                busy = self.engine.has_unfinished_requests()
                if not self._drain_inbox(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
                self.last_step_time = time.monotonic()
        except KeyboardInterrupt:  # Ctrl-C on the main thread: a shutdown, not a failure
            self._fail_all(EngineDeadError("the server is shutting down"))
            raise
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            self.error = exc
            self._fail_all(EngineDeadError(f"engine loop failed: {exc!r}"))

    def _drain_inbox(self, block: bool) -> bool:
        """Apply pending admits/aborts; when idle, wait for work. False means shut down."""
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while item is not None:
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
        return False

    def _apply(self, item: _Admit | _Abort) -> None:
        if isinstance(item, _Abort):
            self.engine.abort_request(item.request_id)
            return
        request_id = item.prepared.request_id
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:  # the caller left before admission
            return
        try:
            self.engine.admit(item.prepared)
        except ValueError as exc:
            self._deliver(stream, exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._lock:
                stream = self._streams.get(output.request_id)
            if stream is not None:
                self._deliver(stream, output if output.error is None else ValueError(output.error))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            self._deliver(stream, exc)

    @staticmethod
    def _deliver(stream: _Stream, item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed
            pass
