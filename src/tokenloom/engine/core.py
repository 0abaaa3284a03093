"""The engine core in its own process: the loop that steps ``LLMEngine``, fed and read
over a socket by the server's process (``EngineCoreClient``).

::

    server process                               engine core process (this module)
    ------------------------------------         --------------------------------------
    HTTP, tokenization, validation,              admits / aborts between steps
    grammar checks, one queue per request        engine.step(): schedule, forward, sample,
                                                   stop checks, detokenization
    EngineCoreClient --AdmitRequest/Abort-->     EngineCore
                     <-------CoreOutputs-------  (one message per step: its deltas + stats)

The two share no interpreter, so the server's event loop never waits for the
engine's GIL nor the engine for the event loop's: in one process the engine spent
~0.6 ms a token (at one stream, 135M model) getting the GIL back after waking the
HTTP thread (docs/performance.md). Detokenization stays here, next to the stop
checks it feeds (a stop string ends a sequence in the step that produced it).
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import time
from dataclasses import dataclass

from tokenloom.config import EngineConfig
from tokenloom.engine.client import AbortRequest, AdmitRequest
from tokenloom.engine.ipc import BlockingChannel
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.stats import EngineStats
from tokenloom.request import RequestOutput

logger = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # an idle core says it is alive this often (the server's /health reads it)


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """What the server's process needs of a loaded engine."""

    config: EngineConfig  # resolved: devices, KV blocks, max_model_len
    vocab_size: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CoreReady:
    info: CoreInfo


@dataclass(frozen=True, slots=True)
class CoreFailed:
    """The engine could not be built (or its loop died): no request can be served.
    ``error`` is the exception itself where it pickles (a startup ValueError or OSError
    is one line for the user, as it is in one process), else a RuntimeError naming it."""

    error: BaseException

    @classmethod
    def of(cls, exc: BaseException) -> CoreFailed:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            return cls(RuntimeError(f"{type(exc).__name__}: {exc}"))
        return cls(exc)


@dataclass(frozen=True, slots=True)
class ShutdownCore:
    pass


@dataclass(frozen=True, slots=True)
class CoreOutputs:
    """One loop turn's news: the step's deltas (without their prompts, which the server
    has), requests the engine refused (request id, why) and the counters after it."""

    outputs: list[RequestOutput]
    rejected: list[tuple[str, str]]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class LogSetup:
    """The server process's logging, repeated in the core's (a spawned process starts bare)."""

    level: int
    format: str | None

    @classmethod
    def of_this_process(cls) -> LogSetup:
        root = logging.getLogger()
        formatter = root.handlers[0].formatter if root.handlers else None
        return cls(root.getEffectiveLevel(), formatter._fmt if formatter is not None else None)

    def apply(self) -> None:
        logging.basicConfig(level=self.level, format=self.format)


def run_engine_core(config: EngineConfig, sock: socket.socket, log_setup: LogSetup) -> None:
    """The core process's main: build the engine, say so, and step until told to stop
    or until the server's end of the socket closes."""
    # Ctrl-C (the terminal's process group) and a SIGTERM sent to every process (systemd,
    # `timeout`) reach the server too, which finishes its streams and then stops us; a core
    # whose server is gone sees the end of its socket and stops on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_setup.apply()
    channel = BlockingChannel(sock)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        user_error = isinstance(exc, (ValueError, OSError))  # the server prints these in one line
        logger.log(logging.DEBUG if user_error else logging.ERROR, "the engine failed to start", exc_info=exc)
        channel.send(CoreFailed.of(exc))
        return
    channel.send(CoreReady(CoreInfo(engine.config, engine.arch.vocab_size, engine.eos_token_ids)))
    try:
        EngineCore(engine, channel).run()
    finally:
        engine.shutdown()


class EngineCore:
    """Between steps: apply what arrived; after each step: send its outputs, one message."""

    def __init__(self, engine: LLMEngine, channel: BlockingChannel) -> None:
        self.engine = engine
        self.channel = channel
        self._rejected: list[tuple[str, str]] = []
        self._last_sent = 0.0

    def run(self) -> None:
        try:
            self._loop()
        except EOFError:
            logger.info("the server closed the engine socket; the engine core stops")
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            self.channel.send(CoreFailed(RuntimeError(f"engine loop failed: {exc!r}")))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            engine.check_health()  # a dead tensor-parallel rank fails the loop within a turn
            busy = engine.has_unfinished_requests()
            for message in self.channel.receive(0 if busy else HEARTBEAT_S):
                if isinstance(message, ShutdownCore):
                    return
                self._apply(message)
            outputs = engine.step() if engine.has_unfinished_requests() else []
            if outputs or self._rejected or busy or time.monotonic() - self._last_sent >= HEARTBEAT_S:
                self._send(outputs)

    def _apply(self, message: object) -> None:
        if isinstance(message, AbortRequest):
            self.engine.abort_request(message.request_id)
        elif isinstance(message, AdmitRequest):
            try:
                self.engine.admit(message.prepared)
            except ValueError as exc:
                self._rejected.append((message.prepared.request_id, str(exc)))
        else:
            raise TypeError(f"unexpected message {type(message).__name__}")

    def _send(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:  # each step's deltas are its own objects: drop what the server has
            o.prompt, o.prompt_token_ids = None, []
        self.channel.send(CoreOutputs(outputs, self._rejected, self.engine.stats.snapshot()))
        self._rejected = []
        self._last_sent = time.monotonic()
