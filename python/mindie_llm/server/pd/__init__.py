# SPDX-License-Identifier: Apache-2.0
"""Prefill/decode disaggregation, serving side: the router (``router``, AsyncLLM-shaped, under the
usual HTTP and gRPC front ends), its metrics (``metrics``), and the internal ``mindie.pd.v1``
service of prefill and decode instances (``instance_service``)."""
