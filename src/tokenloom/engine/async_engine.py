"""AsyncLLMEngine: the engine loop in a thread of this process, one async stream per request.

::

    event loop (HTTP, tokenization)          engine thread
    ------------------------------           -------------------------------
    generate() --prepare (validate)-->       inbox: admit / abort
         ^                                   step() -> RequestOutput deltas
         +------ asyncio.Queue <-- call_soon_threadsafe --+

Only the engine thread touches scheduler and KV state. Model compute runs in
the thread, so the event loop stays responsive while a step is running; but the
two share the GIL, and the engine waits for it after every wake-up of the event
loop. ``tokenloom serve`` therefore runs the loop in its own process
(``EngineCoreClient``); this in-process kind serves tests and embedding.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from tokenloom.engine.client import AbortRequest, AdmitRequest, EngineClient, EngineDeadError, RequestStream
from tokenloom.engine.input_processor import PreparedRequest
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.request import RequestOutput

__all__ = ["AsyncLLMEngine", "EngineDeadError"]

logger = logging.getLogger(__name__)


class AsyncLLMEngine(EngineClient):
    """Background-stepped engine (``EngineClient``) over an ``LLMEngine`` of this process."""

    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05) -> None:
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.structured = engine.structured
        self.inputs = engine.inputs
        self.stats = engine.stats
        self.model_path = str(engine.config.model.model)
        self._inbox: queue.SimpleQueue[AdmitRequest | AbortRequest | None] = queue.SimpleQueue()
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

    def shutdown(self) -> None:
        """Stop the loop, then the engine (its tensor-parallel ranks, where it has them)."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._loop_done.wait(timeout=30)
        self.engine.shutdown()

    async def stop(self) -> None:
        await asyncio.to_thread(self.shutdown)

    @property
    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self.error is None
                and not self._loop_done.is_set())

    # -- requests --------------------------------------------------------------

    def _submit(self, prepared: PreparedRequest) -> None:
        self._inbox.put(AdmitRequest(prepared))

    def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

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

    def _apply(self, item: AdmitRequest | AbortRequest) -> None:
        if isinstance(item, AbortRequest):
            self.engine.abort_request(item.request_id)
            return
        stream = self._stream(item.prepared.request_id)
        if stream is None:  # the caller left before admission
            return
        try:
            self.engine.admit(item.prepared)
        except ValueError as exc:
            self._deliver(stream, exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._stream(output.request_id)
            if stream is not None:
                self._deliver(stream, output if output.error is None else ValueError(output.error))

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._all_streams():
            self._deliver(stream, exc)

    @staticmethod
    def _deliver(stream: RequestStream, item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed
            pass
