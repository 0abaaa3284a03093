"""Tensor-parallel ranks as processes: rank 0 is the engine's own process; this
module starts the others, runs their loop and watches them.

::

    rank 0 (engine, scheduler, sampler)          rank r > 0 (a worker: this module)
    -----------------------------------          -----------------------------------
    LocalRanks: python -c, config on stdin --->  run_worker(): join the group,
    join the group                               load rank r's part of the model
    load rank 0's part                           ...
    gather_object(startup reports) <-----------  its report (weights, or the error)
    resolve the KV cache; broadcast the config -> build its runner (same block count)
    every step: broadcast SchedulerOutput ---->  runner.run_peer_step(out)
       forward: all-reduces <---------------->      forward: all-reduces
       logits: gathered on rank 0 <-----------      its vocabulary columns
    shutdown: broadcast None ----------------->  exit

A rank that dies takes the others' next exchange down with it ("Connection closed
by peer"), and rank 0's watcher notices a local rank's exit at once, so the
server reports the failure (``/health`` 503) rather than hanging. A local rank
also ends when its stdin, the pipe rank 0's process holds open, reaches its end:
rank 0's process is gone (however it went), so no rank outlives it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenloom.config import EngineConfig, resolve_device_defaults
from tokenloom.engine.gpu_profile import profile_forward
from tokenloom.engine.memory import GpuMemoryProfile
from tokenloom.model.footprint import weights_bytes
from tokenloom.model.loader import load_model
from tokenloom.model_files import resolve_model_path
from tokenloom.parallel.group import ProcessTPGroup
from tokenloom.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class RankReport:
    """What a rank tells rank 0 once its part of the model is loaded (or failed to load)."""

    rank: int
    device: str
    weights_bytes: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ProfileRequest:
    """Rank 0 asks every rank to profile one forward of the largest step (CUDA: KV sizing)."""

    config: EngineConfig
    kv_cache_dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class StartRunner:
    """Rank 0's resolved config (the KV block count) and cache dtype: build the runner."""

    config: EngineConfig
    kv_cache_dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class RankPlacement:
    """Where a process sits among the ranks, and whether torchrun started them all."""

    rank: int
    local_rank: int
    init_method: str
    by_torchrun: bool = False


def placement(config: EngineConfig) -> RankPlacement:
    """This process's rank: under torchrun its environment's; else the first rank of its node."""
    parallel = config.parallel
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and parallel.distributed_init_method in (None, "env://"):
        world = int(os.environ["WORLD_SIZE"])
        if world != parallel.tensor_parallel_size:
            raise ValueError(f"torchrun started {world} processes for --tensor-parallel-size "
                             f"{parallel.tensor_parallel_size}")
        return RankPlacement(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), "env://", True)
    method = parallel.distributed_init_method or f"tcp://127.0.0.1:{_free_port()}"
    return RankPlacement(parallel.node_rank * parallel.ranks_per_node, 0, method)


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    device = torch.device(config.model.device)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def split_threads(config: EngineConfig) -> None:
    """On the CPU, the node's ranks share its cores: each takes its share of torch's threads."""
    if torch.device(config.model.device).type == "cpu":
        torch.set_num_threads(max(1, _usable_cpus() // config.parallel.ranks_per_node))


class LocalRanks:
    """The other ranks of this node: fresh interpreters (``python -c``, so that no caller's
    ``__main__`` is imported again, as multiprocessing's spawn would), each told its
    config and place on stdin and watched by a thread of its own. A rank that fails
    writes its error to a pipe, which ``failure`` quotes."""

    def __init__(self, config: EngineConfig, here: RankPlacement) -> None:
        self._stopping = False
        self.failure: str | None = None
        self._error_pipes: dict[int, int] = {}
        self.processes: dict[int, subprocess.Popen] = {}
        first = here.rank - here.local_rank
        for rank in range(first, first + config.parallel.ranks_per_node):
            if rank != here.rank:
                self._start(rank, config, RankPlacement(rank, rank - first, here.init_method))
        for rank, process in self.processes.items():
            threading.Thread(target=self._watch, args=(rank, process), name=f"tokenloom-tp{rank}-watch",
                             daemon=True).start()

    def _start(self, rank: int, config: EngineConfig, place: RankPlacement) -> None:
        read_end, write_end = os.pipe()
        process = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, str(write_end)], stdin=subprocess.PIPE,
                                   pass_fds=(write_end,))
        os.close(write_end)
        process.stdin.write(pickle.dumps((config, place)))
        process.stdin.flush()  # and held open: the rank's lifeline (worker_main)
        self.processes[rank] = process
        self._error_pipes[rank] = read_end

    def check(self) -> None:
        """RuntimeError naming the rank when one has died."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def shutdown(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Wait up to ``grace_s`` for the ranks to leave (after rank 0's stop message),
        then end any left."""
        self._stopping = True
        for process in self.processes.values():
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdin.close()
        for fd in self._error_pipes.values():
            os.close(fd)
        self._error_pipes = {}

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if self._stopping or self.failure is not None:
            return
        try:
            with open(self._error_pipes[rank], closefd=False) as pipe:
                error = pipe.read().strip()
        except (OSError, KeyError):  # shut down meanwhile: the pipe is closed
            error = ""
        self.failure = (f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}"
                        + (f": {error.splitlines()[-1]}" if error else ""))
        logger.error("%s", self.failure)


def run_worker(config: EngineConfig, here: RankPlacement) -> None:
    """A rank other than 0, until rank 0 says stop (or goes away). Its "auto" device,
    dtype and quantization resolve as rank 0's do (a local rank gets them resolved)."""
    config = dataclasses.replace(config, model=resolve_device_defaults(config.model, torch.cuda.is_available()))
    split_threads(config)
    device = rank_device(config, here.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = join_group(here, config.parallel.tensor_parallel_size, device)
    try:
        m = config.model
        torch.manual_seed(m.seed)
        try:
            model, arch = load_model(resolve_model_path(m.model, m.load_format), getattr(torch, m.dtype), device,
                                     m.quantization, m.load_format, m.seed, group)
        except Exception as exc:
            group.gather_object(RankReport(here.rank, str(device), error=f"{type(exc).__name__}: {exc}"))
            raise
        group.gather_object(RankReport(here.rank, str(device), weights_bytes(model)))
        message = group.broadcast_object()
        while isinstance(message, ProfileRequest):
            group.gather_object(profile_forward(message.config, model, arch, message.kv_cache_dtype, device,
                                                peer=True))
            message = group.broadcast_object()
        if not isinstance(message, StartRunner):
            return  # rank 0 gave up during startup
        cache, sched = message.config.cache, message.config.scheduler
        runner = ModelRunner(model, arch, cache.num_blocks, cache.block_size, message.kv_cache_dtype, device,
                             sched.max_num_seqs, sched.max_model_len)
        while (out := group.broadcast_object()) is not None:
            runner.run_peer_step(out)
    finally:
        group.close()


def run_rank_process(config: EngineConfig, here: RankPlacement) -> None:
    """A process that is not rank 0 (torchrun's, or the first of a node other than 0):
    it starts its node's other ranks (unless torchrun did) and is a worker itself."""
    ranks = None if here.by_torchrun else LocalRanks(config, here)
    try:
        run_worker(config, here)
    finally:
        if ranks is not None:
            ranks.shutdown()


class TensorParallel:
    """Rank 0's side: the group, this node's other ranks, and the startup handshake.
    ``stop()`` (also run when the engine is collected or the interpreter exits) ends
    the ranks; ``check_health()`` raises once a local rank has died."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        self.size = config.parallel.tensor_parallel_size
        here = placement(config)
        if here.rank != 0:
            raise ValueError(f"this process is tensor-parallel rank {here.rank}, a worker: rank 0 runs the engine")
        split_threads(config)
        self.ranks = None if here.by_torchrun else LocalRanks(config, here)
        self._stopped = False
        try:
            self.group = self._join(here, device)
        except BaseException:
            self.stop(graceful=False)
            raise

    def check_reports(self, own: RankReport) -> list[RankReport]:
        """Every rank's report; ValueError naming each rank that could not load its part."""
        reports = self.group.gather_object(own)
        failed = [r for r in reports if r.error is not None]
        if failed:
            raise ValueError("; ".join(f"tensor-parallel rank {r.rank}: {r.error}" for r in failed))
        return reports

    def profile(self, request: ProfileRequest, own: Callable[[], GpuMemoryProfile]) -> list[GpuMemoryProfile]:
        """Every rank's profile of the largest step, run in lockstep (CUDA KV sizing)."""
        self.group.broadcast_object(request)
        return self.group.gather_object(own())

    def start_runners(self, config: EngineConfig, kv_cache_dtype: torch.dtype) -> None:
        self.group.broadcast_object(StartRunner(config, kv_cache_dtype))

    def check_health(self) -> None:
        if self.ranks is not None:
            self.ranks.check()

    def stop(self, graceful: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        group = getattr(self, "group", None)
        if graceful and group is not None:
            try:
                group.broadcast_object(None)
            except RuntimeError:  # a rank is gone already
                pass
        if self.ranks is not None:
            self.ranks.shutdown(grace_s=_STOP_GRACE_S if graceful else 0.0)
        if group is not None:
            group.close()

    def _join(self, here: RankPlacement, device: torch.device) -> ProcessTPGroup:
        """Join the group while watching the local ranks: one that dies before it joins is
        an error now, not after the rendezvous timeout."""
        joined: list[ProcessTPGroup | BaseException] = []

        def join() -> None:
            try:
                joined.append(join_group(here, self.size, device))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                joined.append(exc)

        thread = threading.Thread(target=join, name="tokenloom-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            self.check_health()
            thread.join(timeout=0.1)
        if isinstance(joined[0], BaseException):
            raise joined[0]
        return joined[0]


def join_group(here: RankPlacement, size: int, device: torch.device) -> ProcessTPGroup:
    """This process's place in the group; OSError (one clear line at startup) where the
    ranks cannot meet: a port in use, node 0 out of reach within the timeout."""
    try:
        return ProcessTPGroup(here.init_method, here.rank, size, device)
    except RuntimeError as exc:  # torch.distributed's DistNetworkError, DistStoreError, ...
        raise OSError(f"the tensor-parallel ranks could not meet at {here.init_method}: {exc}") from exc


_WORKER_MAIN = "import sys; from tokenloom.engine.tensor_parallel import worker_main; worker_main(int(sys.argv[1]))"


def worker_main(error_fd: int) -> None:
    """A local rank's process: its config and place from stdin, run_worker, and on failure
    the error on ``error_fd`` for rank 0 and exit code 1. It also exits when stdin ends:
    the process that started it is gone."""
    config, here = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_exit_at_end_of, args=(sys.stdin.fileno(),), name="tokenloom-lifeline", daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s tp{here.rank} %(name)s: %(message)s")
    with os.fdopen(error_fd, "w") as errors:
        try:
            run_worker(config, here)
        except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process exits
            errors.write("".join(traceback.format_exception_only(type(exc), exc)))
            errors.flush()
            sys.exit(1)


def _exit_at_end_of(fd: int) -> None:
    """Read the raw pipe (not ``sys.stdin.buffer``, whose lock a daemon thread must not
    hold when the interpreter finalizes) until its end, then leave."""
    while os.read(fd, 4096):
        pass
    os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
