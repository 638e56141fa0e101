# SPDX-License-Identifier: Apache-2.0
"""The Ascend NPU backend: ``runtime`` (the lazy, guarded torch_npu import), ``platform.NpuPlatform``,
the op table ``ops`` (every op mapped to the torch_npu call vllm-ascend uses), ``attention`` (the
step's NPU attention metadata and the decode / prefill attention calls), ``quant`` (quantized
matmuls), ``comm`` (HCCL groups and the fused matmul + all-reduce), ``graph`` (NPUGraph decode
capture). Importing the package imports none of them, and nothing here imports torch_npu at module
level. Must not import anything above ``mindie_llm.ops`` (no layers, executor, models, engine)."""
