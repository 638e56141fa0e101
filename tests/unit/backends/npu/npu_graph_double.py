# SPDX-License-Identifier: Apache-2.0
"""ACL-graph emulation for the torch_npu double (``torch.npu.NPUGraph``, ``torch.npu.graph``, task
groups and task updates) on the CPU.

Capture records, in order, every aten op the captured code runs (a TorchDispatchMode) and every
torch_npu call of the double (as one node: the call and its bound arguments). ``replay()`` re-runs
the nodes on the same tensors: an op writing in place writes the same memory again, an op making a
new tensor has its result copied into the tensor captured then, a torch_npu call is re-made with
its captured arguments. Host values read during capture (Python ints, host tensors) stay those of
capture time, as on the device; a task group (``graph_task_group_begin/end``) can have its call's
arguments replaced before a replay (``graph_task_update_begin/end``), which is how the backend
feeds ATB paged attention the step's context lengths. Nothing here is timing-faithful.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["GraphEmulation"]


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: "_Graph") -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph.nodes.append(("aten", func, args, kwargs, out))
        return out


def _copy_into(captured: Any, fresh: Any) -> None:
    cap, _ = tree_flatten(captured)
    new, _ = tree_flatten(fresh)
    for c, n in zip(cap, new):
        if isinstance(c, torch.Tensor) and isinstance(n, torch.Tensor):
            same = c.data_ptr() == n.data_ptr() and c.shape == n.shape and c.stride() == n.stride()
            if not same:
                c.copy_(n)


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[tuple] = []
        self.captured = False

    def replay(self) -> None:
        if not self.captured:
            raise AssertionError("NPUGraph.replay() before a capture")
        for node in self.nodes:
            if node[0] == "aten":
                _, func, args, kwargs, out = node
                _copy_into(out, func(*args, **kwargs))
            else:
                _, call, (args, kwargs), out = node
                _copy_into(out, call(*args, **kwargs))


class GraphEmulation:
    """The graph half of the double's ``torch.npu``: installs its functions on ``npu``."""

    def __init__(self) -> None:
        self.capturing: _Graph | None = None
        self._recorder: _Recorder | None = None
        self._group: int | None = None
        self._update: int | None = None
        self.num_updates = 0

    def attach(self, npu: Any) -> None:
        npu.NPUGraph = _Graph
        npu.graph = self.graph
        npu.graph_pool_handle = lambda: object()
        npu.is_current_stream_capturing = lambda: self.capturing is not None
        npu.graph_task_group_begin = self.group_begin
        npu.graph_task_group_end = self.group_end
        npu.graph_task_update_begin = self.update_begin
        npu.graph_task_update_end = self.update_end

    @contextlib.contextmanager
    def graph(self, g: _Graph, pool: Any = None, stream: Any = None):
        if self.capturing is not None:
            raise AssertionError("nested NPU graph capture")
        self.capturing, self._recorder = g, _Recorder(g)
        try:
            with self._recorder:
                yield g
        finally:
            self.capturing, self._recorder = None, None
            g.captured = True

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Runs one torch_npu call of the double; during capture it becomes one graph node (its own
        aten ops are not recorded), during a task update it replaces a task group's call."""
        if self._update is not None:
            g, index = self._update_target
            _, call, _, out = g.nodes[index]
            g.nodes[index] = ("npu", call, (args, kwargs), out)
            self.num_updates += 1
            return None
        if self.capturing is None:
            return fn(*args, **kwargs)
        with torch.utils._python_dispatch._disable_current_modes():
            out = fn(*args, **kwargs)
        self.capturing.nodes.append(("npu", fn, (args, kwargs), out))
        return out

    def group_begin(self, stream: Any) -> None:
        if self.capturing is None:
            raise AssertionError("graph_task_group_begin outside a capture")
        self._group = len(self.capturing.nodes)

    def group_end(self, stream: Any) -> tuple:
        g, start = self.capturing, self._group
        if g is None or start is None or len(g.nodes) != start + 1 or g.nodes[start][0] != "npu":
            raise AssertionError("a task group must hold exactly one torch_npu call")
        self._group = None
        return (g, start)

    def update_begin(self, stream: Any, handle: tuple) -> None:
        if self.capturing is not None:
            raise AssertionError("graph_task_update_begin during a capture")
        self._update, self._update_target = 1, handle

    def update_end(self, stream: Any) -> None:
        if self._update is None:
            raise AssertionError("graph_task_update_end without begin")
        self._update = None
