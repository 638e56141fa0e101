# SPDX-License-Identifier: Apache-2.0
"""MultiprocExecutor: tensor parallelism over N processes (this node or several), behind the same
``Executor`` interface as one in-process worker.

Rank 0 (this process) owns the engine, the scheduler and the server, and a ``Worker`` with its
shard. Every step it broadcasts the step message (``SchedulerOutput.encode()``: flat int64 and
float32 arrays behind a validated header, ``distributed.step_channel``; no pickle) and runs its own
worker; the other ranks run ``run_worker``: receive, decode, execute, repeat. Every rank samples:
the LM head's logits are all-gathered, the sampler is seeded per request, so every rank draws the
same tokens and only rank 0's result is used; no result message crosses a process boundary.

Ranks come from a launcher (torchrun, ``scripts/launch``: the torchrun variables are set) or, on
one node without one, are started here as child processes (their environment: ``comm_env``,
multicast off). Rank r of a node runs on device ``LOCAL_RANK`` (``Platform.rank_device``); the
group's backend is ``parallel.comm_backend`` (auto: gloo on the CPU, NCCL on CUDA; gloo on CUDA
lets several ranks share one card, with device graphs off). Faults: every collective has
``parallel.timeout_s``; while idle rank 0 sends heartbeats (so a worker that loses rank 0 exits)
and every worker refreshes a liveness key in the rendezvous store (so rank 0 names a rank that
stopped). A dead or hung rank turns ``check_health`` into ``WorkerDiedError`` naming the rank;
``shutdown`` sends SHUTDOWN and reaps (then kills) the children.

Must not import the engine, the scheduler extension or the server.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from mindie_llm.config import EngineConfig
from mindie_llm.contract import ModelRunnerOutput, SchedulerOutput
from mindie_llm.distributed.comm_env import with_comm_env
from mindie_llm.distributed.parallel_state import (CollectiveTimeout, TorchrunEnv, destroy,
                                                   init_from_env, read_torchrun_env, resolve_backend)
from mindie_llm.distributed.step_channel import Kind, StepChannel
from mindie_llm.executor.executor import Executor
from mindie_llm.executor.worker import Worker

__all__ = ["MultiprocExecutor", "WorkerDiedError", "run_worker", "main"]

logger = logging.getLogger(__name__)

_ALIVE_PERIOD_S = 0.5
_STALE_S = 3.0          # a liveness key older than this names its rank as stopped


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank died, hung or stopped answering; the message names it."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config: EngineConfig) -> str:
    """The tensor-parallel group's backend: ``parallel.comm_backend`` (auto = the device's)."""
    from mindie_llm.backends import get_platform

    platform = get_platform(config.backend.device)
    return resolve_backend(config.parallel.comm_backend, platform.device_type, platform.dist_backend)


def _rank_device(config: EngineConfig, local_rank: int) -> Any:
    from mindie_llm.backends import get_platform

    return get_platform(config.backend.device).rank_device(local_rank)


def _mark_alive(store: Any, rank: int, stop: threading.Event) -> None:
    while not stop.wait(_ALIVE_PERIOD_S):
        try:
            store.set(f"alive/{rank}", repr(time.time()))
        except Exception:   # noqa: BLE001 - rank 0 (the store) is gone; the channel notices too
            return


class MultiprocExecutor(Executor):
    """Rank 0's executor for ``parallel.tensor_parallel_size`` > 1."""

    def __init__(self, config: EngineConfig, *, loaded_model: Any = None) -> None:
        pc = config.parallel
        backend = _backend(config)              # a bad parallel.comm_backend fails before any spawn
        self.tp = pc.tensor_parallel_size
        self.timeout_s = pc.timeout_s
        self._children: dict[int, subprocess.Popen] = {}
        self._config_file: str | None = None
        self._dead: str | None = None
        self._closed = False
        self._lock = threading.Lock()         # one step or one heartbeat at a time
        self._stop = threading.Event()
        self._store_lock = threading.Lock()
        self._last_health = 0.0
        env = read_torchrun_env()
        if env is None:
            if pc.nnodes > 1:
                raise ValueError("parallel.nnodes > 1: start every node with scripts/launch (torchrun)")
            # one node, no launcher: the ranks meet on a free loopback port (parallel.master_port
            # is the rendezvous of a multi-node launch)
            env = TorchrunEnv(0, self.tp, 0, "127.0.0.1", _free_port())
            self._spawn_local_workers(config, env)
        elif env.rank != 0:
            raise ValueError(f"MultiprocExecutor runs on rank 0; this is rank {env.rank} (use run_worker)")
        try:
            self.parallel = init_from_env(backend, tensor_parallel_size=self.tp, timeout_s=pc.timeout_s,
                                          join_timeout_s=pc.join_timeout_s, env=env,
                                          device=_rank_device(config, env.local_rank))
            self.channel = StepChannel(self.parallel)
            local_world = self.tp if self._children else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            self.driver = Worker(config, rank=0, parallel=self.parallel, loaded_model=loaded_model,
                                 local_world_size=local_world)
        except BaseException:
            self._reap(kill=True)
            _destroy_soon()
            raise
        self.info = self.driver.info
        self.config = self.driver.config
        self._last_send = self._last_health = time.monotonic()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="tp-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.shutdown)          # the offline LLM API has no explicit close

    # ---------------------------------------------------------------------------------- steps
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.check_health()
        ints, floats = out.encode()
        with self._lock:
            try:
                self.channel.send(Kind.STEP, ints, floats)
                res = self.driver.execute(out)
            except CollectiveTimeout as e:
                raise self._fail(str(e)) from None
            self._last_send = time.monotonic()
        return res

    def _heartbeat_loop(self) -> None:
        period = max(0.2, min(2.0, self.timeout_s / 4))
        while not self._stop.wait(period / 2):
            if time.monotonic() - self._last_send < period:
                continue
            with self._lock:
                if self._closed or self._dead:
                    return
                try:
                    self.channel.send(Kind.HEARTBEAT)
                    self._last_send = time.monotonic()
                except Exception as e:    # noqa: BLE001 - any failure here means a rank is gone
                    self._fail(str(e))
                    return

    # ---------------------------------------------------------------------------------- health
    def _who_failed(self) -> str | None:
        for rank, p in sorted(self._children.items()):
            code = p.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} exited with code {code}"
        store = self.parallel.store if hasattr(self, "parallel") else None
        if store is not None:
            now = time.time()
            for rank in range(1, self.tp):
                try:
                    last = float(store.get(f"alive/{rank}").decode()) if store.check([f"alive/{rank}"]) else None
                except Exception:  # noqa: BLE001
                    last = None
                if last is None or now - last > _STALE_S:
                    ago = "never" if last is None else f"{now - last:.1f} s ago"
                    return f"tensor-parallel rank {rank} stopped answering (last seen {ago})"
        return None

    def _fail(self, detail: str) -> WorkerDiedError:
        if self._dead is None:
            # a peer's sockets close before its process is reaped or its liveness key goes stale:
            # give the evidence a moment so that the message names the rank
            deadline = time.monotonic() + 2 * _STALE_S
            while True:
                with self._store_lock:
                    who = self._who_failed()
                if who or time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            who = who or f"a tensor-parallel rank failed ({detail.splitlines()[0][:200]})"
            self._dead = who
            logger.error("%s", who)
        return WorkerDiedError(self._dead)

    def check_health(self) -> None:
        """Raises WorkerDiedError naming the rank once a child exited, a rank's liveness key went
        stale (a hung or stopped process) or a collective failed."""
        if self._dead is None and not self._closed:
            now = time.monotonic()
            if now - self._last_health >= _ALIVE_PERIOD_S:
                self._last_health = now
                with self._store_lock:
                    who = self._who_failed()
                if who:
                    self._dead = who
                    logger.error("%s", who)
        if self._dead is not None:
            raise WorkerDiedError(self._dead)

    # ---------------------------------------------------------------------------------- lifecycle
    def _spawn_local_workers(self, config: EngineConfig, env: TorchrunEnv) -> None:
        fd, path = tempfile.mkstemp(prefix="mindie-tp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config.to_dict(), f)
        self._config_file = path
        for rank in range(1, env.world_size):
            child_env = with_comm_env(RANK=str(rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(rank),
                                      LOCAL_WORLD_SIZE=str(env.world_size),
                                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
                                      MINDIE_PARENT_PID=str(os.getpid()))
            self._children[rank] = subprocess.Popen(
                [sys.executable, "-m", "mindie_llm.executor.multiproc_executor", "--config-json", path],
                env=child_env, start_new_session=False)

    def _reap(self, kill: bool = False, wait_s: float = 10.0) -> None:
        deadline = time.monotonic() + (0 if kill else wait_s)
        for rank, p in self._children.items():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._config_file:
            try:
                os.unlink(self._config_file)
            except OSError:
                pass
            self._config_file = None

    def shutdown(self) -> None:
        if self._closed:
            return
        self._stop.set()
        clean = False
        with self._lock:
            self._closed = True
            if self._dead is None and hasattr(self, "channel"):
                try:
                    self.channel.send(Kind.SHUTDOWN)
                    clean = True
                except Exception:  # noqa: BLE001 - a rank is gone already; the children are reaped below
                    pass
        self._reap(kill=not clean)
        _destroy_soon()


def _destroy_soon(wait_s: float = 5.0) -> None:
    """Leaves the process group (so that this process can build another executor), giving up
    after ``wait_s`` when a dead peer makes the teardown block."""
    t = threading.Thread(target=destroy, daemon=True)
    t.start()
    t.join(wait_s)


# ---------------------------------------------------------------------------------- ranks > 0
def run_worker(config: EngineConfig) -> int:
    """The loop of a rank > 0: join, build the worker, execute every step message until SHUTDOWN.
    Returns the exit code; a failure prints one line naming the rank."""
    env = read_torchrun_env()
    rank = env.rank if env else -1
    stop = threading.Event()
    try:
        pc = config.parallel
        if env is None or env.rank == 0:
            raise ValueError("run_worker is for ranks > 0 (RANK/WORLD_SIZE must be set by the launcher)")
        parallel = init_from_env(_backend(config), tensor_parallel_size=pc.tensor_parallel_size,
                                 timeout_s=pc.timeout_s, join_timeout_s=pc.join_timeout_s, env=env,
                                 device=_rank_device(config, env.local_rank))
        threading.Thread(target=_mark_alive, args=(parallel.store, rank, stop), daemon=True).start()
        _watch_parent()
        worker = Worker(config, rank=rank, parallel=parallel)
        channel = StepChannel(parallel)
        while True:
            msg = channel.recv()
            if msg.kind == Kind.SHUTDOWN:
                break
            if msg.kind == Kind.STEP:
                worker.execute(SchedulerOutput.decode(msg.ints, msg.floats))
        stop.set()
        destroy()
        return 0
    except Exception as e:  # noqa: BLE001 - one line naming the rank, then a non-zero exit
        print(f"mindie-llm worker rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        stop.set()


def _watch_parent() -> None:
    """A worker started by rank 0 on this node exits when rank 0's process is gone."""
    ppid = os.environ.get("MINDIE_PARENT_PID")
    if not ppid:
        return

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != int(ppid):
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """``python -m mindie_llm.executor.multiproc_executor --config-json F`` (started by rank 0) or
    ``--config YAML [--set a.b=c ...]`` (started by a launcher on every node)."""
    import argparse

    ap = argparse.ArgumentParser(prog="mindie-llm-worker")
    ap.add_argument("--config-json")
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 decides when the workers stop
    if args.config_json:
        with open(args.config_json, encoding="utf-8") as f:
            config = EngineConfig.from_dict(json.load(f))
    elif args.config:
        config = EngineConfig.from_yaml(args.config, args.set)
    else:
        config = EngineConfig.from_overrides(args.set)
    grace = float(config.server.drain_timeout_s) + 10.0

    def on_term(_sig, _frame) -> None:
        # rank 0 drains first and then sends SHUTDOWN; exit anyway if it never comes
        t = threading.Timer(grace, lambda: os._exit(143))
        t.daemon = True
        t.start()

    signal.signal(signal.SIGTERM, on_term)
    code = run_worker(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown: a dead peer must not stall the exit


if __name__ == "__main__":
    main()
