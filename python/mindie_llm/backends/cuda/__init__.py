# SPDX-License-Identifier: Apache-2.0
"""The CUDA backend: Triton kernels for the fused ops (``ops``), the platform (``platform``:
NCCL, KV-cache sizing, bf16/fp16) and the CUDA-graph decode runner (``model_runner``).

Importing this package imports neither triton nor CUDA, so it never fails on a machine without a
GPU; the kernel modules are imported when the platform registers them.
"""
