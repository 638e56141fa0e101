# SPDX-License-Identifier: Apache-2.0
"""Sampling bounds are one source of truth: the HTTP, native gRPC and KServe front ends accept and
refuse exactly the same values (sampling_params.SAMPLING_BOUNDS), each naming the field.

Oracle: the table itself. Every field is fed its edge values (accepted everywhere) and values just
outside (refused everywhere); before the table, temperature 150 was refused on HTTP (cap 100) and
accepted over gRPC and KServe (finite only), and repetition_penalty 50 likewise.
"""
from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from mindie_llm.config import EngineConfig
from mindie_llm.engine.async_llm import AsyncLLM
from mindie_llm.sampling_params import SAMPLING_BOUNDS
from mindie_llm.server.grpc.errors import RpcError
from mindie_llm.server.grpc.generation_service import GenerationServicer
from mindie_llm.server.grpc.generation_service import pb2 as gen_pb2
from mindie_llm.server.grpc.kserve_params import serialize_bytes_tensor
from mindie_llm.server.grpc.kserve_service import KServeServicer
from mindie_llm.server.grpc.kserve_service import pb2 as ks_pb2
from mindie_llm.server.http.app import build_app

from test_http_fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(60)

INT_FIELDS = {"top_k", "min_tokens"}
# (field, value, accepted?) for every bounded field: edges in, just-outside out.
CASES = [
    ("temperature", 0.0, True), ("temperature", 100.0, True), ("temperature", 150.0, False),
    ("temperature", -0.5, False),
    ("top_p", 1.0, True), ("top_p", 0.01, True), ("top_p", 0.0, False), ("top_p", 1.5, False),
    ("min_p", 0.0, True), ("min_p", 1.0, True), ("min_p", 1.01, False), ("min_p", -0.1, False),
    ("presence_penalty", 2.0, True), ("presence_penalty", -2.0, True), ("presence_penalty", 2.5, False),
    ("frequency_penalty", -2.0, True), ("frequency_penalty", -3.0, False),
    ("repetition_penalty", 10.0, True), ("repetition_penalty", 0.5, True), ("repetition_penalty", 50.0, False),
    ("repetition_penalty", 0.0, False),
    ("top_k", -1, True), ("top_k", 5, True), ("top_k", -2, False),
    ("min_tokens", 0, True), ("min_tokens", 2, True), ("min_tokens", -1, False),
]


def test_the_cases_cover_every_bounded_scalar():
    assert {f for f, _, _ in CASES} == set(SAMPLING_BOUNDS) - {"stop_token_ids", "logit_bias", "logit_bias.token_id"}


def _cfg() -> EngineConfig:
    return EngineConfig.from_dict({"server": {"max_tokens_limit": 64}})


def _http(field: str, value: float) -> tuple[bool, str | None]:
    async def main() -> httpx.Response:
        llm = AsyncLLM(FakeEngine(), _cfg())
        app = build_app(llm, llm.config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 4,
                                                      field: value})
        await llm.shutdown()
        return r

    r = asyncio.run(main())
    assert r.status_code in (200, 400), r.text
    return r.status_code == 200, (r.json()["error"]["param"] if r.status_code == 400 else None)


class _Llm:
    model_name = "fake-model"
    tokenizer = FakeEngine().tokenizer


def _grpc(field: str, value: float) -> tuple[bool, str | None]:
    svc = GenerationServicer(_Llm(), _cfg())
    sampling = gen_pb2.SamplingParameters(max_tokens=4, **{field: value})
    try:
        svc._prepare(gen_pb2.GenerateRequest(text="hi", sampling=sampling))
    except RpcError as e:
        return False, e.message.split(":")[0]
    return True, None


def _kserve(field: str, value: float) -> tuple[bool, str | None]:
    svc = KServeServicer(_Llm(), _cfg())
    req = ks_pb2.ModelInferRequest(model_name="fake-model")
    for name, dt, raw in (("text_input", "BYTES", serialize_bytes_tensor([b"hi"])),
                          ("sampling_parameters", "BYTES",
                           serialize_bytes_tensor([json.dumps({"max_tokens": 4, field: value}).encode()]))):
        req.inputs.add(name=name, datatype=dt, shape=[1])
        req.raw_input_contents.append(raw)
    try:
        svc._prepare(req)
    except ValueError as e:
        return False, str(e).split(":")[0]
    return True, None


@pytest.mark.parametrize(("field", "value", "ok"), CASES)
def test_http_grpc_and_kserve_agree(field: str, value: float, ok: bool):
    v = int(value) if field in INT_FIELDS else value
    got = {"http": _http(field, v), "grpc": _grpc(field, v), "kserve": _kserve(field, v)}
    assert {k: a for k, (a, _) in got.items()} == {"http": ok, "grpc": ok, "kserve": ok}, got
    if not ok:  # each refusal names the field (gRPC prefixes the message: sampling.<field>)
        assert got["http"][1] == field and got["grpc"][1] == f"sampling.{field}", got
        assert got["kserve"][1] in (field, f"sampling_parameters.{field}"), got


@pytest.mark.parametrize("bad", [-1, 1 << 31, 1 << 63])
def test_stop_token_ids_out_of_int32_are_refused_everywhere(bad: int):
    assert _http("stop_token_ids", [bad])[0] is False
    with pytest.raises(ValueError, match="stop_token_ids"):
        from mindie_llm.sampling_params import SamplingParams
        SamplingParams(stop_token_ids=[bad])


def _grpc_bias(bias: dict[int, float]) -> tuple[bool, str | None]:
    svc = GenerationServicer(_Llm(), _cfg())
    sampling = gen_pb2.SamplingParameters(max_tokens=4, logit_bias=bias)
    try:
        svc._prepare(gen_pb2.GenerateRequest(text="hi", sampling=sampling))
    except RpcError as e:
        return False, e.message.split(":")[0]
    return True, None


# logit_bias (a map, so not in CASES): HTTP (JSON keys are strings) and native gRPC (int64 keys)
# agree on the edges; the vocabulary (256 for the fake engine's tokenizer) is checked over gRPC
# here and over HTTP by the real engine (test_http_logit_bias.py). KServe does not carry it.
@pytest.mark.parametrize(("bias", "ok"), [
    ({5: 100.0}, True), ({5: -100.0}, True), ({0: 0.5, 255: 1.0}, True), ({i: 1.0 for i in range(256)}, True),
    ({5: 100.5}, False), ({5: -101.0}, False), ({5: float("nan")}, False), ({5: float("inf")}, False),
    ({-1: 1.0}, False), ({i: 1.0 for i in range(301)}, False),
])
def test_logit_bias_bounds_agree_on_http_and_grpc(bias, ok):
    got = {"grpc": _grpc_bias(bias)}
    if all(math.isfinite(v) for v in bias.values()):        # JSON has no NaN or infinity
        got["http"] = _http("logit_bias", {str(k): v for k, v in bias.items()})
    assert {k: a for k, (a, _) in got.items()} == dict.fromkeys(got, ok), got
    if not ok:
        assert got["grpc"][1] == "sampling.logit_bias", got
        assert got.get("http", (False, "logit_bias"))[1] == "logit_bias", got


def test_grpc_logit_bias_outside_the_vocabulary_names_the_field():
    assert _grpc_bias({256: 1.0}) == (False, "sampling.logit_bias")
    assert _grpc_bias({255: 1.0}) == (True, None)
