# SPDX-License-Identifier: Apache-2.0
"""``ParallelContext``: the rank, size and process group of one tensor-parallel group, and its
collectives (all-reduce that can return a handle, all-gather, broadcast, barrier), every one with a
timeout. The context is an explicit object handed to the layer factories and the loader; there is
no module-global parallel state.

``init_from_env`` builds the group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) over ``torch.distributed`` (gloo on the CPU, NCCL on CUDA, HCCL on the
NPU; ``resolve_backend`` applies ``parallel.comm_backend``). A device rank first binds its device
(``torch.cuda.set_device``), so that NCCL builds its communicator on cuda:LOCAL_RANK. A peer that
never joins or stops answering turns into a ``CollectiveTimeout`` naming what waited, never a hang.

Collectives on a device library (NCCL, HCCL) are stream-ordered: ``wait`` makes the current stream
wait for the communicator's (it never blocks the host, so that a step's kernels queue ahead and a
CUDA graph can capture the all-reduce); a hung peer is bounded by the group's own timeout (the
library's watchdog). gloo waits on the host with ``timeout_s``. gloo with device tensors (one card
shared by several ranks: NCCL refuses two ranks on one GPU) stages each collective through host
memory; such a group cannot be captured in a graph (``graph_capturable``). Host-side control
collectives (``all_reduce_min``, ``barrier``) run on the CPU control group whatever the backend.

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
           "read_torchrun_env", "init_from_env", "destroy", "resolve_backend", "BACKENDS"]

DEFAULT_TIMEOUT_S = 60.0
BACKENDS = ("gloo", "nccl", "hccl")
_DEVICE_BACKEND = {"cuda": "nccl", "npu": "hccl"}       # the device library each backend needs
_STREAM_ORDERED = ("nccl", "hccl")                      # wait() = a stream dependency, capturable


def resolve_backend(requested: str, device_type: str, default: str, key: str = "parallel.comm_backend") -> str:
    """The process-group backend for ``requested`` (auto | gloo | nccl | hccl) on ``device_type``:
    auto = the platform's ``default``; nccl needs cuda and hccl needs npu; gloo runs anywhere (device
    tensors are staged through host memory). A ValueError names ``key`` otherwise."""
    if requested == "auto":
        return default
    if requested not in BACKENDS:
        raise ValueError(f"{key}: must be one of auto, {', '.join(BACKENDS)}; got {requested!r}")
    need = {v: k for k, v in _DEVICE_BACKEND.items()}.get(requested)
    if need is not None and device_type != need:
        raise ValueError(f"{key}: {requested} needs backend.device={need}; this deployment runs on {device_type} "
                         "(use auto or gloo)")
    return requested


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
    """The handle of an asynchronous torch.distributed work item; ``wait`` returns the result.
    ``staged``: the host copy a gloo group reduced for a device tensor (copied back on wait)."""

    __slots__ = ("work", "tensor", "ctx", "what", "staged")

    def __init__(self, work: Any, tensor: torch.Tensor, ctx: "ParallelContext", what: str,
                 staged: torch.Tensor | None = None):
        self.work, self.tensor, self.ctx, self.what, self.staged = work, tensor, ctx, what, staged

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            work, self.work = self.work, None
            self.ctx._wait(work, self.what)
            if self.staged is not None:
                self.tensor.copy_(self.staged)
                self.staged = None
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

    @property
    def graph_capturable(self) -> bool:
        """Can a device graph capture this group's collectives? (NCCL/HCCL yes; gloo no: a
        tensor-parallel step over gloo runs eagerly.)"""
        return self.size == 1 or self.backend in _STREAM_ORDERED

    def _stage(self, t: torch.Tensor) -> torch.Tensor | None:
        """The host copy a gloo group communicates for a device tensor (None: ``t`` itself)."""
        if self.backend == "gloo" and t.device.type != "cpu":
            return t.detach().to("cpu")
        return None

    # ---------------------------------------------------------------------------- collectives
    def _wait(self, work: Any, what: str) -> None:
        """Waits for a collective of the tensor group."""
        if self.backend in _STREAM_ORDERED:
            # a stream dependency, no host wait (capturable; a hung peer is the watchdog's)
            work.wait()
            return
        self._host_wait(work, what)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False) -> Any:
        """Sums ``t`` across the group in place. ``async_op=False``: returns ``t`` reduced;
        ``async_op=True``: returns a handle whose ``wait()`` returns ``t`` reduced."""
        if self.size == 1:
            return _Done(t) if async_op else t
        import torch.distributed as dist

        self.stats["all_reduce"] += 1
        staged = self._stage(t)
        work = dist.all_reduce(t if staged is None else staged, group=self.group, async_op=True)
        handle = _Pending(work, t, self, "all_reduce", staged)
        return handle if async_op else handle.wait()

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's ``t`` (same shape on every rank) along ``dim``, rank order."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        self.stats["all_gather"] += 1
        t = t.contiguous()
        device = t.device
        if self.backend == "gloo":
            t = t.to("cpu")                     # gloo: host buffers (a device tensor is staged)
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        work = dist.all_gather_into_tensor(out, t, group=self.group, async_op=True) \
            if hasattr(dist, "all_gather_into_tensor") and self.backend != "gloo" else \
            dist.all_gather(list(out.unbind(0)), t, group=self.group, async_op=True)
        self._wait(work, "all_gather")
        out = out.to(device)
        dim = dim % t.dim()
        return torch.cat(out.unbind(0), dim=dim) if dim else out.reshape((-1,) + tuple(t.shape[1:]))

    def broadcast(self, t: torch.Tensor, src: int = 0, async_op: bool = False) -> Any:
        """Broadcasts ``t`` from ``src`` in place (the receivers' ``t`` must have the right shape)."""
        if self.size == 1:
            return _Done(t) if async_op else t
        import torch.distributed as dist

        staged = self._stage(t)
        work = dist.broadcast(t if staged is None else staged, src=src, group=self.group, async_op=True)
        handle = _Pending(work, t, self, "broadcast", staged)
        return handle if async_op else handle.wait()

    def _host_wait(self, work: Any, what: str) -> None:
        """A host wait with ``timeout_s`` (control collectives on the CPU group)."""
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise CollectiveTimeout(f"{what} on rank {self.rank}/{self.size} failed or timed out after "
                                    f"{self.timeout_s:g} s (a peer rank died or hangs): {e}") from None
        if ok is False:
            raise CollectiveTimeout(f"{what} on rank {self.rank}/{self.size} timed out after "
                                    f"{self.timeout_s:g} s (a peer rank died or hangs)")

    @property
    def cpu_group(self) -> Any:
        """The group host tensors travel on: the gloo control group (the tensor group itself
        when that is gloo)."""
        return self.control_group if self.control_group is not None else self.group

    def all_reduce_min(self, value: int) -> int:
        """The minimum of an integer across the group (e.g. the KV block count); on the CPU group."""
        if self.size == 1:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group, async_op=True)
        self._host_wait(work, "all_reduce(min)")
        return int(t.item())

    def barrier(self) -> None:
        """Every rank's host reached this point (the CPU group; device work is not waited for)."""
        if self.size > 1:
            import torch.distributed as dist

            work = dist.all_reduce(torch.zeros(1), group=self.cpu_group, async_op=True)
            self._host_wait(work, "barrier")


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
                  join_timeout_s: float | None = None, env: TorchrunEnv | None = None,
                  device: torch.device | None = None) -> ParallelContext:
    """Joins the default process group from torchrun's variables (or ``env``) and returns the
    context of its one tensor-parallel group (WORLD_SIZE must equal ``tensor_parallel_size``).
    ``device``: this rank's device; a CUDA device is bound first (``torch.cuda.set_device``) and
    NCCL's communicator is created on it at once. Not every rank joining within
    ``join_timeout_s`` raises JoinTimeout naming the rendezvous; a communicator that cannot be
    built (NCCL: two ranks on one GPU) raises RuntimeError with the library's message."""
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
    from mindie_llm.distributed.comm_env import apply_comm_env

    apply_comm_env()                            # multicast off before any communicator exists
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
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
    except (RuntimeError, OSError) as e:
        raise JoinTimeout(f"parallel: rank {env.rank}: the rendezvous at {where} did not gather "
                          f"{env.world_size} ranks within {join:g} s (a node never joined, or "
                          f"master_addr/master_port differ between nodes): {str(e).splitlines()[0]}") from None
    kwargs: dict[str, Any] = {}
    if backend == "nccl" and device is not None and device.type == "cuda":
        kwargs["device_id"] = device            # eager communicator on this rank's GPU
    try:
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=env.rank,
                                world_size=env.world_size, timeout=td, **kwargs)
    except (RuntimeError, OSError) as e:
        msg = " ".join(str(e).split())
        if backend in _STREAM_ORDERED:
            last = msg.partition("Last error:")[2].strip()          # NCCL's own reason, when it gives one
            hint = (" (NCCL needs one GPU per rank; ranks that share a card run with parallel.comm_backend=gloo)"
                    if "Duplicate GPU" in msg else "")
            raise RuntimeError(f"parallel: rank {env.rank}: the {backend} communicator of {env.world_size} ranks "
                               f"could not be created on {device}: {last or msg[:400]}{hint}") from None
        msg = msg[:400]
        raise JoinTimeout(f"parallel: rank {env.rank}: the rendezvous at {where} did not gather "
                          f"{env.world_size} ranks within {join:g} s (a node never joined, or "
                          f"master_addr/master_port differ between nodes): {msg}") from None
    control = dist.new_group(backend="gloo", timeout=td) if backend != "gloo" else dist.new_group(timeout=td)
    return ParallelContext(rank=env.rank, size=env.world_size, group=dist.group.WORLD, timeout_s=timeout_s,
                           backend=backend, control_group=control, store=store)


def destroy() -> None:
    """Leaves the default process group (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
