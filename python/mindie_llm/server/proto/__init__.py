# SPDX-License-Identifier: Apache-2.0
"""Protocol buffers of the gRPC front end: ``mindie_generation.proto`` (package ``mindie.v1``) and
``kserve_grpc_service.proto`` (package ``inference``, KServe v2 / Triton).

The ``*_pb2*.py`` stubs are generated here at build time by setup.py (grpcio-tools) and are not
committed. Must not import anything of the package.
"""
