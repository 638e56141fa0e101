# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind ``mindie-llm bench`` (offline throughput) and ``mindie-llm bench serve``
(an online load generator over HTTP or gRPC). Outside the serving core: nothing in the engine,
executor or server imports this package."""
