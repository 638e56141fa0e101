# SPDX-License-Identifier: Apache-2.0
"""The step-message channel: rank 0 broadcasts each step's message to every other rank as a
fixed header and one flat payload, over ``torch.distributed`` (a CPU gloo group of its own, so
control traffic never interleaves with the model's collectives). No pickle and no Python object
crosses: the payload is the ``(int64[n_ints], float32[n_floats])`` pair of
``SchedulerOutput.encode()``, packed in one int64 buffer.

Header (int64[8]): MAGIC, VERSION, kind, sequence number, n_ints, n_floats, checksum, 0.
Kinds: STEP (a step message), HEARTBEAT (rank 0 is alive and idle), SHUTDOWN (stop). A receiver
checks everything before it uses any of it: the magic and version, a known kind, the sequence
number (one more than the last), the sizes within the caps, the padding word and, after the
payload, its checksum; anything else is a ``MalformedMessage`` and the receiver stops.

Imports only torch and numpy.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass

import numpy as np
import torch

from mindie_llm.distributed.parallel_state import ParallelContext

__all__ = ["StepChannel", "Kind", "Message", "MalformedMessage", "MAGIC", "VERSION", "MAX_INTS",
           "MAX_FLOATS", "HEADER_WORDS", "checksum"]

MAGIC = 0x4D49_4E44_4945_5450   # "MINDIETP"
VERSION = 1
HEADER_WORDS = 8
MAX_INTS = 1 << 26               # 512 MiB of int64: far above any step's message
MAX_FLOATS = 1 << 24
_MASK = (1 << 63) - 1


class Kind(enum.IntEnum):
    STEP = 1
    HEARTBEAT = 2
    SHUTDOWN = 3


class MalformedMessage(ValueError):
    """A header or payload that does not validate; says which field."""


@dataclass
class Message:
    kind: Kind
    seq: int
    ints: np.ndarray     # int64[n_ints]
    floats: np.ndarray   # float32[n_floats]


def checksum(payload: np.ndarray) -> int:
    """A position-weighted sum of the int64 payload words (mod 2^63): order and value sensitive."""
    if payload.size == 0:
        return 0
    words = payload.astype(np.uint64, copy=False)
    weights = (np.arange(payload.size, dtype=np.uint64) * np.uint64(0x9E3779B1)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return int(np.bitwise_xor.reduce(words * weights) ^ np.uint64(payload.size)) & _MASK


def _pack(ints: np.ndarray, floats: np.ndarray) -> np.ndarray:
    f = np.ascontiguousarray(floats, dtype=np.float32)
    if f.size % 2:
        f = np.concatenate([f, np.zeros(1, np.float32)])
    return np.concatenate([np.ascontiguousarray(ints, dtype=np.int64), f.view(np.int64)])


class StepChannel:
    """One sender (rank 0) and N-1 receivers over ``parallel``'s control group. ``send`` is
    thread-safe (a heartbeat thread and the engine loop may both send)."""

    def __init__(self, parallel: ParallelContext, group=None):
        self.parallel = parallel
        self.group = group if group is not None else (parallel.control_group or parallel.group)
        self._seq = 0
        self._lock = threading.Lock()
        self.closed = False

    # ------------------------------------------------------------------ sender (rank 0)
    def send(self, kind: Kind, ints: np.ndarray | None = None, floats: np.ndarray | None = None) -> None:
        ints = np.zeros(0, np.int64) if ints is None else np.asarray(ints)
        floats = np.zeros(0, np.float32) if floats is None else np.asarray(floats)
        if ints.dtype != np.int64 or floats.dtype != np.float32 or ints.ndim != 1 or floats.ndim != 1:
            raise TypeError("step message: ints must be int64[n] and floats float32[n]")
        if ints.size > MAX_INTS or floats.size > MAX_FLOATS:
            raise ValueError(f"step message: {ints.size} ints / {floats.size} floats exceed the caps")
        payload = _pack(ints, floats)
        with self._lock:
            if self.closed:
                raise RuntimeError("step channel: closed")
            self._seq += 1
            header = np.array([MAGIC, VERSION, int(kind), self._seq, ints.size, floats.size,
                               checksum(payload), 0], dtype=np.int64)
            self._broadcast(torch.from_numpy(header), "header")
            if payload.size:
                self._broadcast(torch.from_numpy(payload), "payload")
            if kind == Kind.SHUTDOWN:
                self.closed = True

    def send_raw_header(self, header: np.ndarray) -> None:
        """Broadcasts an arbitrary header (tests of the receiver's validation only)."""
        with self._lock:
            self._broadcast(torch.from_numpy(np.ascontiguousarray(header, dtype=np.int64)), "header")

    # ------------------------------------------------------------------ receivers
    def recv(self) -> Message:
        header = torch.zeros(HEADER_WORDS, dtype=torch.int64)
        self._broadcast(header, "header")
        h = header.numpy()
        if int(h[0]) != MAGIC:
            raise MalformedMessage(f"step message header: magic {int(h[0]):#x} is not {MAGIC:#x}")
        if int(h[1]) != VERSION:
            raise MalformedMessage(f"step message header: version {int(h[1])} (this rank speaks {VERSION}; "
                                   "every node must run the same release)")
        if int(h[2]) not in Kind._value2member_map_:
            raise MalformedMessage(f"step message header: unknown kind {int(h[2])}")
        if int(h[3]) != self._seq + 1:
            raise MalformedMessage(f"step message header: sequence {int(h[3])} after {self._seq} (a message was "
                                   "lost or repeated)")
        n_ints, n_floats = int(h[4]), int(h[5])
        if not 0 <= n_ints <= MAX_INTS:
            raise MalformedMessage(f"step message header: n_ints {n_ints} outside [0, {MAX_INTS}]")
        if not 0 <= n_floats <= MAX_FLOATS:
            raise MalformedMessage(f"step message header: n_floats {n_floats} outside [0, {MAX_FLOATS}]")
        if int(h[7]) != 0:
            raise MalformedMessage("step message header: reserved word is not 0")
        self._seq += 1
        words = n_ints + (n_floats + 1) // 2
        payload = torch.zeros(words, dtype=torch.int64)
        if words:
            self._broadcast(payload, "payload")
        p = payload.numpy()
        if checksum(p) != int(h[6]):
            raise MalformedMessage("step message payload: checksum mismatch")
        ints = p[:n_ints].copy()
        floats = p[n_ints:].view(np.float32)[:n_floats].copy()
        return Message(Kind(int(h[2])), int(h[3]), ints, floats)

    def _broadcast(self, t: torch.Tensor, what: str) -> None:
        p = self.parallel
        if p.size == 1:
            return
        import torch.distributed as dist

        work = dist.broadcast(t, src=0, group=self.group, async_op=True)
        p._host_wait(work, f"step channel {what} broadcast")
