# SPDX-License-Identifier: Apache-2.0
"""The serving front ends of mindie-llm.

``launcher`` (``mindie-llm serve``) starts, in one process, the OpenAI-compatible HTTP app
(``http/``) and the gRPC servers (``grpc/``: ``mindie.v1`` and KServe v2) over one
``mindie_llm.engine.async_llm.AsyncLLM``. ``auth`` (constant-time API key), ``metrics``
(Prometheus) and ``protocol_limits`` (request caps) are shared by both protocols.

Nothing here imports torch or the ``LLMEngine`` directly; importing this package is cheap.
"""
