# SPDX-License-Identifier: Apache-2.0
"""``ParallelContext``: the rank, size and process group of one tensor-parallel group, and its
collectives (all-reduce that can return a handle, all-gather, broadcast, barrier), every one with a
timeout. The context is an explicit object handed to the layer factories and the loader; there is
no module-global parallel state.

``init_from_env`` builds the group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) over ``torch.distributed`` (gloo on the CPU, NCCL on CUDA, HCCL on the
NPU). A peer that never joins or stops answering turns into a ``CollectiveTimeout`` naming what
waited, never a hang.

Imports only torch: this module sits below layers (layers take a context; they never import the
executor or a backend).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch

__all__ = ["ParallelContext", "Handle", "CollectiveTimeout", "JoinTimeout", "TorchrunEnv",
           "read_torchrun_env", "init_from_env", "destroy"]

DEFAULT_TIMEOUT_S = 60.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the group's timeout (a peer died or hangs)."""


class JoinTimeout(RuntimeError):
    """Not every rank joined the process group within the join timeout."""


class Handle(Protocol):
    def wait(self) -> torch.Tensor: ...


class _Done:
    """The handle of a collective that needed no communication (size 1)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def wait(self) -> torch.Tensor:
        return self.tensor


class _Pending:
    """The handle of an asynchronous torch.distributed work item; ``wait`` returns the result."""

    __slots__ = ("work", "tensor", "ctx", "what")

    def __init__(self, work: Any, tensor: torch.Tensor, ctx: "ParallelContext", what: str):
        self.work, self.tensor, self.ctx, self.what = work, tensor, ctx, what

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            work, self.work = self.work, None
            self.ctx._wait(work, self.what)
        return self.tensor


@dataclass
class ParallelContext:
    """One tensor-parallel group. ``size == 1`` needs no process group and runs no collective."""

    rank: int = 0
    size: int = 1
    group: Any = None                     # a torch.distributed ProcessGroup when size > 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: str = "none"                 # gloo | nccl | hccl | none
    control_group: Any = None             # a CPU (gloo) group for step messages; None at size 1
    store: Any = None                     # the rendezvous TCPStore (liveness keys); None at size 1
    # fused matmul + all-reduce ``f(x[T, K], weight[N, K], bias[N] | None) -> [T, N]`` summed over
    # the group, where the device has one (Ascend MC2: torch_npu.npu_mm_all_reduce_base); set by
    # the platform, used by the row-parallel linears; None = matmul, then all_reduce
    matmul_all_reduce: Any = None
    stats: dict[str, float] = field(default_factory=lambda: {"all_reduce": 0, "all_gather": 0})

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"parallel: rank {self.rank} / size {self.size} is impossible")
        if self.size > 1 and self.group is None:
            raise ValueError("parallel: a process group is required when size > 1")

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls()

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------- collectives
    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise CollectiveTimeout(f"{what} on rank {self.rank}/{self.size} failed or timed out after "
                                    f"{self.timeout_s:g} s (a peer rank died or hangs): {e}") from None
        if ok is False:
            raise CollectiveTimeout(f"{what} on rank {self.rank}/{self.size} timed out after "
                                    f"{self.timeout_s:g} s (a peer rank died or hangs)")

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        """Sums ``t`` across the group in place. ``async_op=False``: returns ``t`` reduced;
        ``async_op=True``: returns a handle whose ``wait()`` returns ``t`` reduced."""
        if self.size == 1:
            return _Done(t) if async_op else t
        import torch.distributed as dist

        self.stats["all_reduce"] += 1
        work = dist.all_reduce(t, group=self.group, async_op=True)
        handle = _Pending(work, t, self, "all_reduce")
        return handle if async_op else handle.wait()

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's ``t`` (same shape on every rank) along ``dim``, rank order."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        self.stats["all_gather"] += 1
        t = t.contiguous()
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        work = dist.all_gather_into_tensor(out, t, group=self.group, async_op=True) \
            if hasattr(dist, "all_gather_into_tensor") and self.backend != "gloo" else \
            dist.all_gather(list(out.unbind(0)), t, group=self.group, async_op=True)
        self._wait(work, "all_gather")
        dim = dim % t.dim()
        return torch.cat(out.unbind(0), dim=dim) if dim else out.reshape((-1,) + tuple(t.shape[1:]))

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Broadcasts ``t`` from ``src`` in place (the receivers' ``t`` must have the right shape)."""
        if self.size == 1:
            return _Done(t) if async_op else t
        import torch.distributed as dist

        work = dist.broadcast(t, src=src, group=self.group, async_op=True)
        handle = _Pending(work, t, self, "broadcast")
        return handle if async_op else handle.wait()

    def all_reduce_min(self, value: int) -> int:
        """The minimum of an integer across the group (e.g. the KV block count)."""
        if self.size == 1:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group, async_op=True)
        self._wait(work, "all_reduce(min)")
        return int(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            self.all_reduce(torch.zeros(1))


# -------------------------------------------------------------------------------- torchrun
@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def read_torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The torchrun variables, or None when the process was not started by a launcher. A present
    but malformed variable is a ValueError naming it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None

    def num(name: str, default: str | None = None) -> int:
        raw = env.get(name, default)
        if raw is None:
            raise ValueError(f"{name}: required by torch.distributed when RANK/WORLD_SIZE are set")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}: must be an integer; got {raw!r}") from None

    world, rank = num("WORLD_SIZE"), num("RANK")
    local = num("LOCAL_RANK", str(rank))
    port = num("MASTER_PORT", "29500")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK/WORLD_SIZE: rank {rank} is not in [0, {world})")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT: must be a TCP port; got {port}")
    return TorchrunEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port)


def init_from_env(backend: str, *, tensor_parallel_size: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                  join_timeout_s: float | None = None, env: TorchrunEnv | None = None) -> ParallelContext:
    """Joins the default process group from torchrun's variables (or ``env``) and returns the
    context of its one tensor-parallel group (WORLD_SIZE must equal ``tensor_parallel_size``).
    Not every rank joining within ``join_timeout_s`` raises JoinTimeout naming the rendezvous."""
    import torch.distributed as dist

    env = env or read_torchrun_env()
    if env is None:
        if tensor_parallel_size == 1:
            return ParallelContext.single()
        raise ValueError("parallel.tensor_parallel_size > 1 needs RANK, WORLD_SIZE, MASTER_ADDR and "
                         "MASTER_PORT (start the ranks with scripts/launch or torchrun)")
    if env.world_size != tensor_parallel_size:
        raise ValueError(f"parallel.tensor_parallel_size={tensor_parallel_size} but WORLD_SIZE={env.world_size} "
                         "(one rank per tensor-parallel shard)")
    if env.world_size == 1:
        return ParallelContext.single()
    join = join_timeout_s if join_timeout_s is not None else timeout_s
    where = f"{env.master_addr}:{env.master_port}"
    td = datetime.timedelta(seconds=timeout_s)
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # under torchrun the agent has gathered every node already (its rendezvous has the
            # join timeout) and hosts the store; the workers are its clients
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, False,
                                  timeout=datetime.timedelta(seconds=join))
        else:
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, env.rank == 0,
                                  timeout=datetime.timedelta(seconds=join), wait_for_workers=True)
        store = dist.PrefixStore("mindie/", store)
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=env.rank,
                                world_size=env.world_size, timeout=td)
    except (RuntimeError, OSError) as e:
        raise JoinTimeout(f"parallel: rank {env.rank}: the rendezvous at {where} did not gather "
                          f"{env.world_size} ranks within {join:g} s (a node never joined, or "
                          f"master_addr/master_port differ between nodes): {str(e).splitlines()[0]}") from None
    control = dist.new_group(backend="gloo", timeout=td) if backend != "gloo" else dist.new_group(timeout=td)
    return ParallelContext(rank=env.rank, size=env.world_size, group=dist.group.WORLD, timeout_s=timeout_s,
                           backend=backend, control_group=control, store=store)


def destroy() -> None:
    """Leaves the default process group (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
