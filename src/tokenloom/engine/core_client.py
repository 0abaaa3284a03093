"""EngineCoreClient: the server's side of an engine core running in its own process.

``launch`` spawns the core (``engine/core.py``), which loads the model while this
process waits for its ``CoreReady``; then this process loads the tokenizer and
serves. On the event loop, the socket is read by a reader callback and written
without blocking (what the kernel cannot take yet waits for a writer callback),
so no thread is involved on this side and no lock is shared with the engine.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import socket
import time
from multiprocessing.process import BaseProcess

from tokenloom.config import EngineConfig
from tokenloom.engine.client import AbortRequest, AdmitRequest, EngineClient, EngineDeadError, RequestStream
from tokenloom.engine.core import (
    CoreFailed,
    CoreInfo,
    CoreOutputs,
    CoreReady,
    LogSetup,
    ShutdownCore,
    run_engine_core,
)
from tokenloom.engine.input_processor import InputProcessor, PreparedRequest
from tokenloom.engine.ipc import FrameDecoder, encode, read_frame
from tokenloom.engine.llm_engine import load_tokenizer
from tokenloom.engine.stats import EngineStats
from tokenloom.request import RequestOutput
from tokenloom.structured import StructuredOutputManager

logger = logging.getLogger(__name__)

_RECV_BYTES = 1 << 20
_STOP_TIMEOUT_S = 30.0


class LatestStats:
    """The engine's counters as of the core's last message."""

    def __init__(self) -> None:
        self.latest = EngineStats()

    def snapshot(self) -> EngineStats:
        return self.latest


class EngineCoreClient(EngineClient):
    """An ``EngineClient`` whose engine loop runs in a child process."""

    def __init__(self, process: BaseProcess, sock: socket.socket, info: CoreInfo) -> None:
        super().__init__()
        self.process = process
        self.config = info.config
        self.tokenizer = load_tokenizer(info.config.model)
        self.structured = StructuredOutputManager(self.tokenizer, info.vocab_size, info.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, info.vocab_size, info.config.scheduler.max_model_len)
        self.stats = LatestStats()
        self.model_path = str(info.config.model.model)
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()
        self._sock = sock
        self._decoder = FrameDecoder()
        self._pending = bytearray()  # encoded messages the socket has not taken yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._stopped = False
        atexit.register(self._kill)  # before multiprocessing's own exit hook joins the child

    @classmethod
    def launch(cls, config: EngineConfig) -> EngineCoreClient:
        """Start the core process and wait until its engine is built (RuntimeError if it
        cannot be: the core's reason)."""
        ours, theirs = socket.socketpair()
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, theirs, LogSetup.of_this_process()), name="tokenloom-engine-core")
        process.start()
        theirs.close()
        try:
            message = read_frame(ours)
        except EOFError:
            process.join()
            raise RuntimeError(f"the engine core exited while starting (exit code {process.exitcode})") from None
        if isinstance(message, CoreFailed):
            process.join()
            raise message.error
        assert isinstance(message, CoreReady)
        logger.info("engine core ready in process %d", process.pid)
        return cls(process, ours, message.info)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Read the core's messages on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)
        if self._pending:
            self._flush()

    async def stop(self) -> None:
        """Ask the core to stop after its current step, and wait for it to exit."""
        if self._stopped:
            return
        self._stopping = True
        self._send(ShutdownCore())
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while self.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._kill()

    def _kill(self) -> None:
        """The end, however it comes: no more reading, the core gone."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()  # a core still running sees the end of its socket and stops
        self.process.join(timeout=_STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    @property
    def is_alive(self) -> bool:
        return not self._stopping and not self._stopped and self.error is None and self.process.is_alive()

    # -- requests --------------------------------------------------------------

    def _submit(self, prepared: PreparedRequest) -> None:
        self._send(AdmitRequest(prepared))

    def abort(self, request_id: str) -> None:
        if not self._stopped:
            self._send(AbortRequest(request_id))

    def _send(self, message: object) -> None:
        """Write now what the socket takes; the rest when it is writable again."""
        was_idle = not self._pending  # otherwise a writer callback is waiting already
        self._pending += encode(message)
        if was_idle and self._loop is not None:
            self._flush()

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(EngineDeadError(f"the engine core's socket failed: {exc}"))
            return
        del self._pending[:sent]
        assert self._loop is not None
        if self._pending:
            self._loop.add_writer(self._sock.fileno(), self._flush)
        else:
            self._loop.remove_writer(self._sock.fileno())

    # -- the core's messages ----------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, reason = b"", str(exc)
        else:
            reason = "it exited"
        if not data and self._stopping:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            return
        if not data:
            self.process.join(timeout=1)
            self._fail(EngineDeadError(f"the engine core is gone: {reason} (exit code {self.process.exitcode})"))
            return
        self.last_step_time = time.monotonic()
        for message in self._decoder.feed(data):
            if isinstance(message, CoreOutputs):
                self._publish(message)
            elif isinstance(message, CoreFailed):
                self._fail(EngineDeadError(str(message.error)))

    def _publish(self, message: CoreOutputs) -> None:
        self.stats.latest = message.stats
        for request_id, reason in message.rejected:
            if (stream := self._stream(request_id)) is not None:
                stream.queue.put_nowait(ValueError(reason))
        for output in message.outputs:
            if (stream := self._stream(output.request_id)) is not None:
                stream.queue.put_nowait(_with_prompt(output, stream) if output.error is None
                                        else ValueError(output.error))

    def _fail(self, exc: EngineDeadError) -> None:
        if self.error is None:
            logger.error("%s", exc)
            self.error = exc
        for stream in self._all_streams():
            stream.queue.put_nowait(exc)
        if self._loop is not None and not self._stopped:
            self._loop.remove_reader(self._sock.fileno())


def _with_prompt(output: RequestOutput, stream: RequestStream) -> RequestOutput:
    """A delta as the engine made it: the core leaves out the prompt, which we sent it
    (the unpickled delta is ours alone, so it is completed in place)."""
    output.prompt, output.prompt_token_ids = stream.prepared.prompt, stream.prepared.prompt_token_ids
    return output
