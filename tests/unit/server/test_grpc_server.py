# SPDX-License-Identifier: Apache-2.0
"""The mindie.v1 gRPC service, health, reflection, auth, TLS, admission and cancellation, over the
real AsyncLLM and ``build_grpc_server`` in-process, with a deterministic stand-in for LLMEngine.

Oracle: the fake engine's rule, computable by hand (:func:`expected_text`): prompt tokens are
character codes; each step appends ``(last + 1) % 26 + 97`` to every running sample. KV accounting
is exact (``ceil(len / block_size)`` blocks per running sample), so leaks are visible.

The KServe service is covered by test_grpc_kserve.py (with tritonclient, against this file run as a
server process) and here only by the check that it shares a process with tritonclient.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from mindie_llm.config import EngineConfig
from mindie_llm.engine.async_llm import AsyncLLM
from mindie_llm.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.grpc.server import build_grpc_server

pb2 = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2")
pb2_grpc = pytest.importorskip("mindie_llm.server.proto.mindie_generation_pb2_grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- the fake engine
class CharTokenizer:
    vocab_size = 256
    eos_token_ids = [0]
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [chr(i) for i in ids]


def next_token(last: int) -> int:
    return (last + 1) % 26 + 97


def expected_text(prompt: str, max_tokens: int) -> str:
    last, out = ord(prompt[-1]) % 256, []
    for _ in range(max_tokens):
        last = next_token(last)
        out.append(chr(last))
    return "".join(out)


@dataclass
class _Req:
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    samples: list[list[int]] = field(default_factory=list)
    running: bool = False


class FakeEngine:
    """The LLMEngine API over the rule above; ``step_delay_s`` slows each step."""

    def __init__(self, *, num_kv_blocks: int = 4096, block_size: int = 4, max_batch_size: int = 256,
                 step_delay_s: float = 0.0, max_model_len: int = 512):
        self.tokenizer = CharTokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.max_batch_size = max_batch_size
        self.step_delay_s = step_delay_s
        self.reqs: dict[str, _Req] = {}
        self.lock = threading.Lock()
        self.stats = EngineStats(num_kv_blocks=num_kv_blocks, num_free_kv_blocks=num_kv_blocks - 1)

    def _used(self) -> int:
        return sum(math.ceil((len(r.prompt_ids) + len(s)) / self.block_size)
                   for r in self.reqs.values() if r.running for s in r.samples)

    def validate_request(self, prompt, params: SamplingParams) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt + max_tokens exceeds max_model_len ({self.max_model_len})")
        return ids

    def add_request(self, request_id, prompt, params, *, arrival_time=None, priority=0) -> None:
        ids = self.validate_request(prompt, params)
        self.reqs[request_id] = _Req(ids, params, time.time(), [[] for _ in range(params.n)])
        self._refresh()

    def abort_request(self, request_id: str) -> None:
        self.reqs.pop(request_id, None)
        self._refresh()

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def _refresh(self) -> None:
        s = self.stats
        s.num_running = sum(len(r.samples) for r in self.reqs.values() if r.running)
        s.num_waiting = sum(len(r.samples) for r in self.reqs.values() if not r.running)
        s.num_free_kv_blocks = self.num_kv_blocks - 1 - self._used()

    def _output(self, rid: str, r: _Req, finished: bool) -> RequestOutput:
        outs = []
        for i, s in enumerate(r.samples):
            done = len(s) >= r.params.max_tokens
            outs.append(CompletionOutput(index=i, text="".join(map(chr, s)), token_ids=list(s),
                                         finish_reason="length" if done else None))
        now = time.time()
        return RequestOutput(rid, None, r.prompt_ids, None, outs, finished,
                             RequestMetrics(arrival_time=r.arrival, first_scheduled_time=r.arrival,
                                            first_token_time=now, last_token_time=now, finished_time=now,
                                            num_prompt_tokens=len(r.prompt_ids)))

    def step(self) -> list[RequestOutput]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        result = []
        for rid, r in list(self.reqs.items())[: self.max_batch_size]:
            r.running = True
            for s in r.samples:
                s.append(next_token(s[-1] if s else r.prompt_ids[-1]))
            finished = all(len(s) >= r.params.max_tokens for s in r.samples)
            result.append(self._output(rid, r, finished))
            if finished:
                del self.reqs[rid]
        self._refresh()
        return result

    def get_stats(self) -> EngineStats:
        return EngineStats(**vars(self.stats))


# ---------------------------------------------------------------------- the server harness
@dataclass
class Running:
    port: int
    llm: AsyncLLM
    engine: FakeEngine
    loop: asyncio.AbstractEventLoop


def _config(**server) -> EngineConfig:
    sched = {"max_queued_requests": server.pop("max_queued_requests", 256), "max_n": 4}
    return EngineConfig.from_dict({"server": {"grpc_port": 0, **server}, "scheduler": sched})


@contextlib.contextmanager
def serve(engine: FakeEngine | None = None, **server):
    """Runs AsyncLLM + build_grpc_server on an event loop in a thread; yields Running."""
    engine = engine or FakeEngine()
    config = _config(**server)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def main() -> None:
        llm = AsyncLLM(engine, config)
        srv = build_grpc_server(llm, config)
        await srv.start()
        holder.update(llm=llm, srv=srv, port=srv.bound_port, stop=asyncio.Event())
        started.set()
        await holder["stop"].wait()
        await srv.stop(0.5)
        await llm.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "gRPC server did not start"
    try:
        yield Running(holder["port"], holder["llm"], engine, loop)
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
        loop.close()


@pytest.fixture(scope="module")
def server():
    with serve(FakeEngine()) as r:
        yield r


def stub_for(port: int, creds=None):
    target = f"127.0.0.1:{port}"
    ch = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    return ch, pb2_grpc.GenerationServiceStub(ch)


@pytest.fixture(scope="module")
def stub(server):
    ch, s = stub_for(server.port)
    yield s
    ch.close()


def req(text="hello", **sampling) -> "pb2.GenerateRequest":
    return pb2.GenerateRequest(text=text, sampling=pb2.SamplingParameters(**sampling))


# ---------------------------------------------------------------------- happy paths
def test_generate_matches_the_engine_rule(stub):
    resp = stub.Generate(req("abc", max_tokens=5, temperature=0.0), timeout=30)
    assert resp.completions[0].text == expected_text("abc", 5)
    assert resp.completions[0].finish_reason == pb2.FINISH_REASON_LENGTH
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 5
    assert list(resp.prompt_token_ids) == [97, 98, 99]
    assert resp.model == "fake-model"
    assert resp.timings.total_ns >= resp.timings.queue_ns >= 0


def test_stream_concatenates_to_the_unary_text(stub):
    unary = stub.Generate(req("xyz", max_tokens=7, seed=3), timeout=30)
    msgs = list(stub.GenerateStream(req("xyz", max_tokens=7, seed=3), timeout=30))
    assert "".join(m.text for m in msgs) == unary.completions[0].text
    assert [t for m in msgs for t in m.token_ids] == list(unary.completions[0].token_ids)
    assert len(msgs) >= 2, "one message per delta"
    assert msgs[-1].finished and msgs[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert not any(m.finished for m in msgs[:-1])
    assert msgs[-1].usage.completion_tokens == 7


def test_n_samples_unary_and_stream(stub):
    resp = stub.Generate(req("q", max_tokens=3, n=3), timeout=30)
    assert [c.index for c in resp.completions] == [0, 1, 2]
    assert all(c.text == expected_text("q", 3) for c in resp.completions)
    msgs = list(stub.GenerateStream(req("q", max_tokens=3, n=2), timeout=30))
    for i in range(2):
        assert "".join(m.text for m in msgs if m.index == i) == expected_text("q", 3)


def test_token_id_prompt(stub):
    resp = stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[100, 101]),
                                             sampling=pb2.SamplingParameters(max_tokens=2)), timeout=30)
    assert resp.completions[0].text == expected_text("de", 2)


def test_tokenize_detokenize_round_trip(stub):
    tok = stub.Tokenize(pb2.TokenizeRequest(text="hi there"), timeout=10)
    assert list(tok.token_ids) == [ord(c) for c in "hi there"]
    assert list(tok.tokens) == list("hi there")
    assert stub.Detokenize(pb2.DetokenizeRequest(token_ids=tok.token_ids), timeout=10).text == "hi there"


def test_model_info(stub):
    info = stub.ModelInfo(pb2.ModelInfoRequest(), timeout=10)
    assert info.model == "fake-model" and info.max_model_len == 512 and info.block_size == 4
    assert info.num_kv_blocks == 4096 and info.vocab_size == 256 and info.max_n == 4
    assert info.capabilities.streaming and info.capabilities.chunked_prefill
    assert info.max_tokens_limit == 4096


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service="mindie.v1.GenerationService"),
                       timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        r = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"mindie.v1.GenerationService", "grpc.health.v1.Health"} <= names


def test_kserve_and_tritonclient_share_one_process(server):
    """Our inference.* messages live in a private descriptor pool, so importing tritonclient next to
    the server works, and reflection still describes the KServe service."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import numpy as np
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    inp = grpcclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
    res = c.infer("fake-model", [inp], parameters={"max_tokens": 3})
    assert res.as_numpy("text_output")[0].decode() == expected_text("abc", 3)
    c.close()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        ans = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")]), timeout=5))
        assert ans[0].file_descriptor_response.file_descriptor_proto


def test_health_not_serving_while_draining():
    with serve() as r, grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        r.loop.call_soon_threadsafe(r.llm.begin_drain)
        time.sleep(0.2)
        assert h.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            pb2_grpc.GenerationServiceStub(ch).Generate(req(max_tokens=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------- malformed requests
_I = grpc.StatusCode.INVALID_ARGUMENT
_NAN, _INF = float("nan"), float("inf")


def _raw_text_field(data: bytes) -> bytes:
    """A GenerateRequest whose `text` (field 3, length-delimited) holds ``data`` as-is."""
    return bytes([0x1A, len(data)]) + data


# (id, method, request (message or raw bytes), expected code, words the message must contain)
MALFORMED = [
    ("no-prompt", "Generate", pb2.GenerateRequest(), _I, "prompt"),
    ("empty-text", "Generate", req(""), _I, "text"),
    ("empty-token-ids", "Generate", pb2.GenerateRequest(token_ids=pb2.TokenIds()), _I, "token_ids"),
    ("negative-token-id", "Generate", pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[5, -1])), _I, "token_ids"),
    ("huge-token-id", "Generate", pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[1 << 40])), _I, "token_ids"),
    ("max-tokens-zero", "Generate", req(max_tokens=0), _I, "max_tokens"),
    ("max-tokens-negative", "Generate", req(max_tokens=-1), _I, "max_tokens"),
    ("max-tokens-huge", "Generate", req(max_tokens=1 << 62), _I, "max_tokens"),
    ("max-tokens-over-limit", "Generate", req(max_tokens=4097), _I, "max_tokens"),
    ("max-tokens-over-model-len", "Generate", req("x" * 500, max_tokens=100), _I, "max_tokens"),
    ("temperature-negative", "Generate", req(temperature=-1.0), _I, "temperature"),
    ("temperature-nan", "Generate", req(temperature=_NAN), _I, "temperature"),
    ("temperature-inf", "Generate", req(temperature=_INF), _I, "temperature"),
    ("top-p-zero", "Generate", req(top_p=0.0), _I, "top_p"),
    ("top-p-above-one", "Generate", req(top_p=1.5), _I, "top_p"),
    ("top-k-below-minus-one", "Generate", req(top_k=-2), _I, "top_k"),
    ("min-p-above-one", "Generate", req(min_p=2.0), _I, "min_p"),
    ("n-zero", "Generate", req(n=0), _I, "n"),
    ("n-over-max-n", "Generate", req(n=5), _I, "n"),
    ("n-huge", "GenerateStream", req(n=1 << 40), _I, "n"),
    ("min-tokens-negative", "Generate", req(min_tokens=-1), _I, "min_tokens"),
    ("min-tokens-over-max", "Generate", req(min_tokens=9, max_tokens=3), _I, "min_tokens"),
    ("too-many-stops", "Generate", req(stop=[f"s{i}" for i in range(17)]), _I, "stop"),
    ("stop-too-long", "Generate", req(stop=["x" * 300]), _I, "stop"),
    ("stop-empty", "Generate", req(stop=[""]), _I, "stop"),
    ("stop-token-id-negative", "Generate", req(stop_token_ids=[-3]), _I, "stop_token_ids"),
    ("stop-token-id-outside-vocab", "Generate", req(stop_token_ids=[1 << 40]), _I, "stop_token_ids"),
    ("logprobs-negative", "Generate", req(logprobs=-1), _I, "logprobs"),
    ("logprobs-over-limit", "Generate", req(logprobs=21), _I, "logprobs"),
    ("presence-penalty", "Generate", req(presence_penalty=3.0), _I, "presence_penalty"),
    ("frequency-penalty", "Generate", req(frequency_penalty=-3.0), _I, "frequency_penalty"),
    ("repetition-penalty-zero", "Generate", req(repetition_penalty=0.0), _I, "repetition_penalty"),
    ("repetition-penalty-nan", "Generate", req(repetition_penalty=_NAN), _I, "repetition_penalty"),
    ("seed-fine-but-priority-huge", "Generate", pb2.GenerateRequest(text="a", priority=1 << 40), _I, "priority"),
    ("unknown-model", "Generate", pb2.GenerateRequest(text="a", model="gpt-9"), grpc.StatusCode.NOT_FOUND, "model"),
    ("garbage-bytes", "Generate", b"\xff\xff\xff\xff", _I, "request"),
    ("invalid-utf8-text", "Generate", _raw_text_field(b"ab\xff\xfe"), _I, "request"),
    ("wrong-wire-type", "Generate", bytes([0x2A ^ 0x02, 0x01]), _I, "request"),
    ("unknown-field", "Generate", req().SerializeToString() + bytes([0x98, 0x06, 0x01]), _I, "unknown field"),
    ("unknown-nested-field", "GenerateStream", b"\x1a\x01a" + bytes([0x2A, 0x03, 0x98, 0x06, 0x01]), _I,
     "request.sampling"),
    ("oversized-message", "Generate", req("a" * (1 << 20) + "b"), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ("tokenize-empty", "Tokenize", pb2.TokenizeRequest(text=""), _I, "text"),
    ("tokenize-unknown-model", "Tokenize", pb2.TokenizeRequest(text="a", model="x"), grpc.StatusCode.NOT_FOUND,
     "model"),
    ("detokenize-out-of-vocab", "Detokenize", pb2.DetokenizeRequest(token_ids=[1, 999]), _I, "token_ids"),
    ("detokenize-negative", "Detokenize", pb2.DetokenizeRequest(token_ids=[-1]), _I, "token_ids"),
    ("model-info-unknown-model", "ModelInfo", pb2.ModelInfoRequest(model="x"), grpc.StatusCode.NOT_FOUND, "model"),
]


def _call_raw(channel: grpc.Channel, method: str, request) -> object:
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    path = f"/mindie.v1.GenerationService/{method}"
    if method == "GenerateStream":
        return list(channel.unary_stream(path)(raw, timeout=30))
    return channel.unary_unary(path)(raw, timeout=30)


def test_malformed_table_size():
    assert len(MALFORMED) >= 30


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_is_rejected_naming_the_field(server, stub, case):
    _, method, request, code, words = case
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            _call_raw(ch, method, request)
    assert e.value.code() == code, e.value.details()
    assert words in (e.value.details() or "")
    assert "Traceback" not in (e.value.details() or "")
    # The canary: the server still answers a good request.
    assert stub.Generate(req("ok", max_tokens=2), timeout=30).completions[0].text == expected_text("ok", 2)


# ---------------------------------------------------------------------- auth and TLS
_ALL_METHODS = {
    "Generate": req(max_tokens=1), "GenerateStream": req(max_tokens=1), "Tokenize": pb2.TokenizeRequest(text="a"),
    "Detokenize": pb2.DetokenizeRequest(token_ids=[97]), "ModelInfo": pb2.ModelInfoRequest(),
}


def test_api_key_on_every_method_but_health():
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with serve(api_key="s3cret") as r, grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
        for method, request in _ALL_METHODS.items():
            raw = request.SerializeToString()
            path = f"/mindie.v1.GenerationService/{method}"
            call = ch.unary_stream(path) if method == "GenerateStream" else ch.unary_unary(path)
            for md in ((), (("authorization", "Bearer wrong"),), (("x-api-key", "s3cre"),),
                       (("authorization", "s3cret"),)):
                with pytest.raises(grpc.RpcError) as e:
                    res = call(raw, timeout=10, metadata=md)
                    if method == "GenerateStream":
                        list(res)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, md)
                assert "s3cret" not in (e.value.details() or "")
            for md in ((("authorization", "Bearer s3cret"),), (("x-api-key", "s3cret"),)):
                res = call(raw, timeout=10, metadata=md)
                if method == "GenerateStream":
                    res = list(res)
                assert res
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open.
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), cert_pem


def test_tls_with_a_certificate_made_here(tmp_path):
    cert, key, cert_pem = _self_signed(tmp_path)
    with serve(tls_cert_file=cert, tls_key_file=key) as r:
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        ch = grpc.secure_channel(f"localhost:{r.port}", creds)
        try:
            out = pb2_grpc.GenerationServiceStub(ch).Generate(req("tls", max_tokens=3), timeout=30)
            assert out.completions[0].text == expected_text("tls", 3)
        finally:
            ch.close()
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as plain:
            with pytest.raises(grpc.RpcError) as e:
                pb2_grpc.GenerationServiceStub(plain).Generate(req(max_tokens=1), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------- admission and cancellation
def test_burst_over_a_small_queue_gets_resource_exhausted():
    engine = FakeEngine(step_delay_s=0.01, max_batch_size=4)
    with serve(engine, max_queued_requests=8) as r:
        ch = grpc.insecure_channel(f"127.0.0.1:{r.port}")
        stub = pb2_grpc.GenerationServiceStub(ch)
        futures = [stub.Generate.future(req(f"p{i}", max_tokens=4), timeout=60) for i in range(200)]
        ok = exhausted = 0
        for i, f in enumerate(futures):
            try:
                assert f.result().completions[0].text == expected_text(f"p{i}", 4)
                ok += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                exhausted += 1
        assert ok + exhausted == 200 and ok >= 8 and exhausted > 0
        assert stub.Generate(req("after", max_tokens=2), timeout=30).completions[0].text == expected_text("after", 2)
        ch.close()


def test_stream_rejected_before_any_message_when_the_queue_is_full():
    engine = FakeEngine(step_delay_s=0.05, max_batch_size=1)
    with serve(engine, max_queued_requests=1) as r, grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        streams = [stub.GenerateStream(req(f"s{i}", max_tokens=20), timeout=60) for i in range(6)]
        rejected = 0
        for s in streams:
            got = []
            try:
                for m in s:
                    got.append(m)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert not got, "RESOURCE_EXHAUSTED must come before any stream message"
                rejected += 1
        assert rejected > 0


def test_cancelled_streams_free_their_kv_blocks():
    engine = FakeEngine(step_delay_s=0.005, block_size=2)
    with serve(engine) as r, grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
        stub = pb2_grpc.GenerationServiceStub(ch)
        baseline = engine.num_kv_blocks - 1
        calls = [stub.GenerateStream(req(f"c{i}", max_tokens=400), timeout=60) for i in range(64)]
        for c in calls:
            next(c)   # generation has started
        assert engine.stats.num_free_kv_blocks < baseline
        for c in calls:
            c.cancel()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (engine.reqs or engine.stats.num_free_kv_blocks != baseline):
            time.sleep(0.05)
        assert not engine.reqs
        assert engine.stats.num_free_kv_blocks == baseline
        assert stub.Generate(req("alive", max_tokens=2), timeout=30).completions[0].text == expected_text("alive", 2)


def test_port_in_use_and_unreadable_tls_files_fail_clearly(tmp_path):
    import socket

    async def build(config: EngineConfig) -> None:   # grpc.aio servers are built on the event loop
        build_grpc_server(AsyncLLM(FakeEngine(), config, start=False), config, enable_kserve=False)

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = EngineConfig.from_dict({"server": {"grpc_port": busy.getsockname()[1]}})
        with pytest.raises(OSError, match="server.grpc_port"):
            asyncio.run(build(config))
    config = EngineConfig.from_dict({"server": {"grpc_port": 0, "tls_cert_file": str(tmp_path / "missing.pem"),
                                                "tls_key_file": str(tmp_path / "missing.key")}})
    with pytest.raises(ValueError, match="server.tls_key_file"):
        asyncio.run(build(config))


def test_bench_client_over_tls_with_a_key(tmp_path):
    import argparse

    from mindie_llm.bench import serve_client as bench_client

    cert, key, _ = _self_signed(tmp_path)
    with serve(tls_cert_file=cert, tls_key_file=key, api_key="k") as r:
        args = bench_client.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--protocol", "grpc", "--host", "localhost", "--port", str(r.port), "--tls-ca", cert, "--api-key", "k",
             "--num-requests", "3", "--input-len", "2", "--output-len", "2"])
        results, _, model = bench_client.run_benchmark(args)
    assert model == "fake-model" and all(x.success and x.output_tokens == 2 for x in results)


# ---------------------------------------------------------------------- a fake-engine server process
def serve_forever(argv: list[str]) -> None:
    """``python test_grpc_server.py [--api-key K] [--max-queued N] [--step-delay S] [--http]``: serves
    the fake engine over gRPC (with the KServe service) on a free port, prints ``PORT <n>`` (and with
    ``--http`` also the OpenAI HTTP app, ``HTTP_PORT <n>`` first), runs until SIGTERM.
    test_grpc_kserve.py and test_bench_client.py use it as a quick server process."""
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-queued", type=int, default=256)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--http", action="store_true")
    a = p.parse_args(argv)

    async def main() -> None:
        config = _config(api_key=a.api_key, max_queued_requests=a.max_queued)
        llm = AsyncLLM(FakeEngine(step_delay_s=a.step_delay), config)
        srv = build_grpc_server(llm, config)
        await srv.start()
        http = None
        if a.http:
            import uvicorn

            from mindie_llm.server.http.app import build_app

            http = uvicorn.Server(uvicorn.Config(build_app(llm, config), host="127.0.0.1", port=0,
                                                 log_level="warning"))
            http_task = asyncio.ensure_future(http.serve())
            while not http.started:
                await asyncio.sleep(0.02)
            print(f"HTTP_PORT {http.servers[0].sockets[0].getsockname()[1]}", flush=True)
        print(f"PORT {srv.bound_port}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        if http is not None:
            http.should_exit = True
            await http_task
        await srv.stop(0.5)
        await llm.shutdown()

    asyncio.run(main())
    sys.exit(0)


if __name__ == "__main__":
    import sys

    serve_forever(sys.argv[1:])
