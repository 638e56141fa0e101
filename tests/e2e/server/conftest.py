# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the server tests (``server_factory``, ``default_server``, ``shared_server``) over the
helpers of server_harness.py:

    def test_x(server_factory):
        srv = server_factory({"scheduler": {"max_queued_requests": 8}})   # merged over BASE_CONFIG
        httpx.get(srv.http_url + "/health"); grpc.insecure_channel(srv.grpc_address)

``server_factory`` is module-scoped: start one server per module (or per distinct config) and share
it; every server it started is stopped (SIGTERM, then SIGKILL) when the module ends.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from server_harness import SHARED_OVERRIDES, ServerProcess, start_server


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``server_factory(overrides=None, env=None) -> ServerProcess``; servers stop at module end."""
    started: list[ServerProcess] = []
    base = tmp_path_factory.mktemp("server")

    def factory(overrides: dict[str, Any] | None = None, *, env: dict[str, str] | None = None) -> ServerProcess:
        srv = start_server(base, overrides, env=env)
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        if srv.proc.poll() is None:
            srv.stop()


@pytest.fixture(scope="module")
def default_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    """One server with ``BASE_CONFIG`` shared by the tests of a module."""
    return server_factory()




@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One HTTP-only server (``BASE_CONFIG`` + ``SHARED_OVERRIDES``) for the whole session: modules
    that only read from it, or that check deltas of /metrics, share it to save start-ups."""
    srv = start_server(tmp_path_factory.mktemp("shared-server"), SHARED_OVERRIDES)
    yield srv
    if srv.proc.poll() is None:
        srv.stop()
