# SPDX-License-Identifier: Apache-2.0
"""Distributed execution below the layers: ``parallel_state`` (ParallelContext: rank, size, process
groups and collectives with timeouts and async handles; the group built from torchrun's
variables), ``step_channel`` (rank 0's step message to every rank: a validated header and flat
arrays, no pickle) ``micro_batch`` (two micro-batches with their all-reduces overlapped) and ``comm_env`` (the
environment of every distributed process: NVLink multicast off).

Imports only torch and numpy (an import contract in pyproject.toml checks it)."""
