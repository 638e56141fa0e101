# SPDX-License-Identifier: Apache-2.0
"""A small, bounds-checked GGUF (v2/v3) parser: metadata, tensor infos and zero-copy views of the
tensor bytes (memory-mapped), plus torch dequantization of the common block types (Q8_0, Q4_0,
Q4_1), bit-identical to ``gguf.quants.dequantize``, which handles every other type.

Why not ``gguf.GGUFReader``: it builds a numpy memmap per field part, which takes seconds for a
49k-token vocabulary; this parser reads the same file in a fraction of a second. Every length and
offset is checked against the file size, so a truncated or corrupt file raises
CorruptCheckpointError naming it instead of allocating or reading out of bounds.
Must not import the engine, models or layers.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mindie_llm.loader.errors import CorruptCheckpointError, ModelNotFoundError

__all__ = ["GGUFFile", "GGUFTensorInfo", "dequantize"]

# GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
# 10 u64, 11 i64, 12 f64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
               11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]     # PyTorch order ([out, in] for a matrix); GGUF stores it reversed
    ggml_type: int
    offset: int                # absolute byte offset in the file
    n_bytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.path, f"truncated or corrupt GGUF: {what} at byte {self.pos}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the {self.size}-byte file")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype])
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            if count > self.size:  # every element takes at least one byte
                raise self.fail(f"{what}: array of {count} elements")
            return [self.value(etype, what) for _ in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")


class GGUFFile:
    """Parses ``path``; ``metadata`` (dict), ``tensors`` (list of GGUFTensorInfo), ``raw(info)``."""

    def __init__(self, path: str):
        import gguf  # block sizes of the ggml types

        if not os.path.isfile(path):
            raise ModelNotFoundError(path, "no such file")
        try:
            self._file = open(path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise ModelNotFoundError(path, f"cannot be read: {e.strerror}") from None
        self.path = path
        buf = memoryview(self._map) if self._map is not None else memoryview(b"")
        self._buf = buf
        c = _Cursor(buf, path)
        c.need(4, "magic")
        if bytes(buf[:4]) != b"GGUF":
            raise CorruptCheckpointError(path, "not a GGUF file (bad magic)")
        c.pos = 4
        self.version = c.scalar("<I", "version")
        if self.version not in (2, 3):
            raise CorruptCheckpointError(path, f"GGUF version {self.version} is not supported (2 or 3)")
        n_tensors = c.scalar("<Q", "tensor count")
        n_kv = c.scalar("<Q", "metadata count")
        if n_tensors > size or n_kv > size:
            raise c.fail(f"{n_tensors} tensors / {n_kv} metadata entries")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            vtype = c.scalar("<I", f"type of {key}")
            self.metadata[key] = c.value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("<I", f"dims of {name}")
            if n_dims > 8:
                raise c.fail(f"tensor {name} has {n_dims} dims")
            dims = [c.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
            ggml_type = c.scalar("<I", f"type of {name}")
            offset = c.scalar("<Q", f"offset of {name}")
            infos.append((name, dims, ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32) or 32)
        data_start = (c.pos + align - 1) // align * align
        self.tensors: list[GGUFTensorInfo] = []
        for name, dims, ggml_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CorruptCheckpointError(path, f"unknown ggml type {ggml_type}", tensor=name) from None
            n_el = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if dims and dims[0] % block:
                raise CorruptCheckpointError(path, f"row of {dims[0]} values is not a multiple of the "
                                                   f"{qtype.name} block ({block})", tensor=name)
            n_bytes = n_el // block * type_size
            start = data_start + offset
            if start + n_bytes > size:
                raise CorruptCheckpointError(path, f"truncated: data ends at byte {start + n_bytes}, "
                                                   f"file has {size}", tensor=name)
            self.tensors.append(GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type,
                                               start, n_bytes))

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array [rows, row_bytes] (no copy)."""
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        arr = np.frombuffer(self._buf, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        return arr.reshape(rows, -1)

    def close(self) -> None:
        self._buf.release()
        if self._map is not None:
            self._map.close()
        self._file.close()


def _blocks(raw: np.ndarray, block_bytes: int) -> torch.Tensor:
    t = torch.from_numpy(raw.reshape(-1, block_bytes).copy())  # [n_blocks, block_bytes] uint8
    return t


def _dequant_q8_0(raw: np.ndarray) -> torch.Tensor:
    b = _blocks(raw, 34)
    d = b[:, :2].contiguous().view(torch.float16).float()          # [n, 1]
    x = b[:, 2:].contiguous().view(torch.int8).float()              # [n, 32]
    return x * d


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs[n, 16] uint8 -> [n, 32]: low nibbles are values 0..15, high nibbles 16..31.
    # NOTE: contiguous first; bitwise ops on strided uint8 views are ~40x slower on the CPU.
    qs = qs.contiguous()
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _dequant_q4_0(raw: np.ndarray) -> torch.Tensor:
    b = _blocks(raw, 18)
    d = b[:, :2].contiguous().view(torch.float16).float()
    q = (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    return d * q


def _dequant_q4_1(raw: np.ndarray) -> torch.Tensor:
    b = _blocks(raw, 20)
    d = b[:, :2].contiguous().view(torch.float16).float()
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    q = _nibbles(b[:, 4:]).float()
    return d * q + m


_TORCH_DEQUANT = {8: _dequant_q8_0, 2: _dequant_q4_0, 3: _dequant_q4_1}  # ggml type ids


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one tensor -> float32 tensor of ``shape``. Raises NotImplementedError for a type the
    gguf package cannot dequantize."""
    import gguf

    fn = _TORCH_DEQUANT.get(ggml_type)
    if fn is not None:
        return fn(raw).reshape(shape)
    qtype = gguf.GGMLQuantizationType(ggml_type)
    if qtype == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(raw.copy().view(np.float32)).reshape(shape)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).float().reshape(shape)
    arr = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
