"""The OpenAI-compatible server in-process (httpx over ASGI): routes, shapes, errors, limits, batching."""

import asyncio
import json

import httpx
import pytest
import torch

from llm_modules.data import encode_prompt
from llm_modules.serving.app import ServeConfig, Server, create_app
from llm_modules.serving.engine import Engine, Request
from llm_modules.serving.registry import parse_model_specs

MSGS = [{"role": "user", "content": "sum of 5 and 5"}]


@pytest.fixture(scope="module")
def server(served_modules):
    s = Server(ServeConfig(models=[(n, served_modules[n]) for n in ("alpha", "beta", "delta")], max_answer_tokens=64),
               log=lambda s: None).load()
    assert s.state == "ready", s.error
    yield s
    s.close()


def call(server, method, path, body=None, headers=None, raw=None):
    async def go():
        transport = httpx.ASGITransport(app=create_app(server, load=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            if raw is not None:
                return await c.request(method, path, content=raw, headers=headers)
            return await c.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def greedy(sm, prompt, n):
    """The module's own greedy continuation of an encoded prompt (what the server must return)."""
    ids = torch.tensor([prompt.input_ids])
    out = sm.module.generate(ids, answer_mask=torch.tensor([prompt.answer]), max_new_tokens=n)
    new = out[0, ids.shape[1]:].tolist()
    eos = sm.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def text_of(tok, ids):
    """What the server sends for these tokens: an incomplete last character is dropped."""
    return tok.decode(ids, skip_special_tokens=False).rstrip("\ufffd")


def sse_events(text):
    lines = [ln[6:] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_health_says_loading_then_ready(served_modules, server):
    loading = Server(ServeConfig(models=[("alpha", served_modules["alpha"])]), log=lambda s: None)
    r = call(loading, "GET", "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = call(loading, "POST", "/v1/chat/completions", {"model": "alpha", "messages": MSGS})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    r = call(server, "GET", "/health")
    assert r.status_code == 200 and r.json()["models"] == ["alpha", "beta", "delta"]


def test_models_share_one_source_per_fingerprint(served_modules):
    s = Server(ServeConfig(models=list(served_modules.items())), log=lambda s: None).load()
    try:
        reg = s.registry
        assert len(reg.sources) == 2  # alpha and beta share one, gamma has its own
        a, b, g = (reg.modules[n].module.source.model for n in ("alpha", "beta", "gamma"))
        assert a is b and a is not g
        cards = {m["id"]: m for m in call(s, "GET", "/v1/models").json()["data"]}
        assert cards["alpha"]["parent"] == cards["beta"]["parent"] != cards["gamma"]["parent"]
        # Clients see each source's folder name, never where it lies on the server's disk.
        assert cards["alpha"]["parent"] == cards["alpha"]["root"] == "large_qwen2" and "/" not in cards["gamma"]["root"]
        assert cards["beta"]["conditioning"] == "prompt" and cards["alpha"]["object"] == "model"
        # gamma (knowledge lookup) got its source's head; alpha and beta's source was loaded without one.
        assert reg.modules["gamma"].module.source.head is not None and reg.modules["alpha"].module.source.head is None
        gm = reg.get("gamma")
        body = {"model": "gamma", "messages": MSGS, "temperature": 0, "max_tokens": 10}
        got = call(s, "POST", "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
        want = greedy(gm, encode_prompt(gm.tokenizer, "paper", MSGS[0]["content"], (), "Be brief."), 10)
        assert got == text_of(gm.tokenizer, want) and len(want) > 0
    finally:
        s.close()


@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_chat_answer_is_the_modules_greedy_answer_streamed_or_not(server, name):
    sm = server.registry.get(name)
    body = {"model": name, "messages": MSGS, "temperature": 0, "max_tokens": 12}
    r = call(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    prompt = encode_prompt(sm.tokenizer, "paper", MSGS[0]["content"], (), "Be brief.")
    want = greedy(sm, prompt, 12)
    msg = out["choices"][0]["message"]
    assert out["object"] == "chat.completion" and msg["role"] == "assistant"
    assert msg["content"] == text_of(sm.tokenizer, want)
    assert out["usage"] == {"prompt_tokens": len(prompt.input_ids), "completion_tokens": len(want),
                            "total_tokens": len(prompt.input_ids) + len(want)}
    assert out["choices"][0]["finish_reason"] == ("length" if len(want) == 12 else "stop")
    r = call(server, "POST", "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in ev)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev if e["choices"]) == msg["content"]
    assert ev[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert ev[-1]["choices"] == [] and ev[-1]["usage"] == out["usage"]


def test_history_and_stop_sequences(server):
    sm = server.registry.get("beta")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sum of 1 and 1"},
               {"role": "assistant", "content": "two"}, {"role": "user", "content": "sum of 5 and 5"}]
    body = {"model": "beta", "messages": history, "temperature": 0, "max_tokens": 12}
    full = call(server, "POST", "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    prompt = encode_prompt(sm.tokenizer, "paper", "sum of 5 and 5", [("user", "sum of 1 and 1"), ("assistant", "two")],
                           "Be brief.")
    assert full == text_of(sm.tokenizer, greedy(sm, prompt, 12))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = call(server, "POST", "/v1/chat/completions", body | {"stop": [stop]}).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    r = call(server, "POST", "/v1/chat/completions", body | {"stop": stop, "stream": True})
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text)) == full[: full.index(stop)]


def test_completions(server):
    sm = server.registry.get("alpha")
    r = call(server, "POST", "/v1/completions", {"model": "alpha", "prompt": "The river", "temperature": 0,
                                                  "max_tokens": 6})
    out = r.json()
    want = greedy(sm, encode_prompt(sm.tokenizer, "raw", "The river"), 6)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == text_of(sm.tokenizer, want)
    r = call(server, "POST", "/v1/completions", {"model": "alpha", "prompt": "The river", "temperature": 0,
                                                  "max_tokens": 6, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in sse_events(r.text)) == out["choices"][0]["text"]


def test_sampling_with_a_seed_repeats(server):
    body = {"model": "alpha", "messages": MSGS, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 10}
    a, b = (call(server, "POST", "/v1/chat/completions", body).json()["choices"][0]["message"]["content"] for _ in "ab")
    assert a == b


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": "nope", "messages": MSGS}, 404, "model", "model_not_found"),
    ({"model": "alpha"}, 400, "messages", None),
    ({"model": "alpha", "messages": []}, 400, "messages", None),
    ({"model": "alpha", "messages": MSGS, "n": 2}, 400, "n", None),
    ({"model": "alpha", "messages": MSGS, "temperature": 3}, 400, "temperature", None),
    ({"model": "alpha", "messages": MSGS, "max_tokens": 65}, 400, "max_tokens", None),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x " * 300}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "x " * 100}], "max_tokens": 64}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": "alpha", "messages": [*MSGS, {"role": "assistant", "content": "ten"}]}, 400, "messages", None),
    ({"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
])
def test_errors_have_openais_shape(server, body, status, param, code):
    r = call(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code


@pytest.mark.parametrize("raw", [
    b"{not json",
    b'{"model": "alpha", "messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8 in a string
    b'{"model": "alpha", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than the parser recurses
])
def test_bodies_the_parser_rejects_are_400s_in_openais_shape(server, raw):
    r = call(server, "POST", "/v1/chat/completions", raw=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_answer_in_openais_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/chat/completions", 405)):
        r = call(server, method, path)
        assert r.status_code == status and r.json()["error"]["message"], r.text


def test_clients_see_the_source_s_name_not_its_path():
    from llm_modules.serving.registry import display_name

    assert display_name("Qwen/Qwen2-1.5B") == "Qwen/Qwen2-1.5B"  # a hub id
    assert display_name("/srv/models/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct"
    assert display_name("/srv/gguf::SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1.gguf"
    assert display_name("./weights/model.gguf") == "model.gguf"


def test_too_many_requests_and_api_key(served_modules, server):
    sm = server.registry.get("alpha")
    busy = Request("alpha", encode_prompt(sm.tokenizer, "raw", "The river"), 200, lambda k, v: None, temperature=0)
    server.cfg.max_concurrent, saved = 1, server.cfg.max_concurrent
    server.engine.submit(busy)  # one request generating: the server is full
    try:
        r = call(server, "POST", "/v1/chat/completions", {"model": "alpha", "messages": MSGS})
    finally:
        busy.cancelled = True
        server.cfg.max_concurrent = saved
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    server.cfg.api_key = "s3cret"
    try:
        assert call(server, "GET", "/v1/models").status_code == 401
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert call(server, "GET", "/health").status_code == 200
        # Every POST route too: no key or a wrong one is a 401 in OpenAI's shape, the key gets an answer.
        for path, body in (("/v1/chat/completions", {"model": "alpha", "messages": MSGS, "max_tokens": 2}),
                           ("/v1/completions", {"model": "alpha", "prompt": "The river", "max_tokens": 2})):
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = call(server, "POST", path, body, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", (path, headers)
            assert call(server, "POST", path, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        server.cfg.api_key = None


@pytest.fixture
def batch_of(server):
    """Make the idle engine wait for exactly n requests before it starts a batch: a batch forms when the n-th
    arrives (the window is only an upper bound), however slowly a loaded machine delivers them."""
    saved = server.engine.batch_window, server.engine.max_batch

    def hold(n):
        server.engine.batch_window, server.engine.max_batch = 600.0, n

    yield hold
    server.engine.batch_window, server.engine.max_batch = saved


@pytest.mark.parametrize("name", ["alpha", "beta", "delta"])  # token and prompt conditioning, the adaptive schedule
def test_concurrent_requests_share_a_batch_and_keep_their_answers(server, batch_of, name):
    bodies = [{"model": name, "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 24}
              for q in ("sum of 5 and 5", "The city of the river was founded in", "hello")]
    source = server.registry.get(name).module.source
    real, calls = source.forward, []
    source.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    alone = []
    try:
        for b in bodies:
            calls.clear()
            alone.append(call(server, "POST", "/v1/chat/completions", b).json()["choices"][0]["message"]["content"])
            alone.append(len(calls))
    finally:
        source.forward = real
    alone, reads = alone[::2], alone[1::2]
    if name == "delta":  # each request alone catches up at its own steps: in the batch, rows catch up apart
        assert len(set(reads)) > 1 and max(reads) > 1, reads
    server.engine.max_rows = 0
    batch_of(3)

    async def together():
        transport = httpx.ASGITransport(app=create_app(server, load=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    assert asyncio.run(together()) == alone
    assert server.engine.max_rows == 3  # one batch: one source pass, one step for all three


def test_failure_mid_stream_is_an_error_event(server):
    module = server.registry.get("alpha").module
    real = module.step

    def broken(new_ids, state=None, *a, **k):
        if state is not None:
            raise RuntimeError("device lost")
        return real(new_ids, state, *a, **k)

    module.step = broken
    try:
        body = {"model": "alpha", "messages": MSGS, "temperature": 0, "max_tokens": 8}
        r = call(server, "POST", "/v1/chat/completions", body | {"stream": True})
        ev = sse_events(r.text)
        assert "device lost" in ev[-1]["error"]["message"] and ev[-1]["error"]["type"] == "server_error"
        r = call(server, "POST", "/v1/chat/completions", body)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
    finally:
        del module.step
    assert call(server, "POST", "/v1/chat/completions", body).status_code == 200  # the engine kept serving


def test_engine_stops_a_cancelled_request(server):
    events = []
    sm = server.registry.get("alpha")
    prompt = encode_prompt(sm.tokenizer, "raw", "The river")
    eng = Engine({"alpha": sm.module}, batch_window=0.0).start()
    try:
        req = Request("alpha", prompt, 200, lambda k, v: (events.append(k), k == "token" and len(events) == 3
                                                          and setattr(req, "cancelled", True)), temperature=0)
        eng.submit(req)
        for _ in range(200):
            if req.done:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert req.done and events.count("token") == 3 and "done" not in events and eng.active == 0
    finally:
        eng.close()


def test_model_specs():
    assert parse_model_specs(["a=/x/y", "/runs/m1/best"]) == [("a", "/x/y"), ("m1", "/runs/m1/best")]
    with pytest.raises(ValueError, match="given twice"):
        parse_model_specs(["a=/x", "a=/y"])


def test_batches_never_outgrow_the_context():
    """Rows are left-padded to the longest prompt and decoded for the largest max_tokens: a long prompt with a
    short answer and a short prompt with a long answer must not share a batch past the context."""
    from llm_modules.data import Example
    from llm_modules.serving.engine import split_batches

    def req(n_prompt, max_tokens):
        return Request("m", Example([1] * n_prompt, [-100] * n_prompt), max_tokens, lambda k, v: None)

    long_prompt, long_answer, small = req(200, 10), req(10, 200), req(20, 20)
    assert [len(b) for b in split_batches([long_prompt, long_answer, small], 16, 256)] == [1, 2]
    assert [len(b) for b in split_batches([long_prompt, long_answer], 16, None)] == [2]
    assert [len(b) for b in split_batches([small] * 5, 2, 256)] == [2, 2, 1]


def test_a_long_prompt_and_a_long_answer_arriving_together_both_succeed(server, batch_of):
    bodies = [{"model": "alpha", "messages": [{"role": "user", "content": "x " * 100}], "temperature": 0,
               "max_tokens": 8},
              {"model": "alpha", "messages": MSGS, "temperature": 0, "max_tokens": 200}]
    batch_of(2)

    async def together():
        transport = httpx.ASGITransport(app=create_app(server, load=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))

    try:
        server.cfg.max_answer_tokens, saved = 200, server.cfg.max_answer_tokens
        rs = asyncio.run(together())
    finally:
        server.cfg.max_answer_tokens = saved
    assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]


def test_metrics_count_requests_tokens_and_latency_and_logs_name_each_request(served_modules):
    """GET /metrics in Prometheus' text format: requests by outcome, tokens, time to first token, time per token,
    rows per step, the queue; every request logged with the id its client got."""
    import re

    logs = []
    s = Server(ServeConfig(models=[("alpha", served_modules["alpha"])]), log=logs.append).load()
    try:
        ids, produced = [], 0
        for n in (5, 3):
            r = call(s, "POST", "/v1/chat/completions", {"model": "alpha", "messages": MSGS, "max_tokens": n,
                                                         "temperature": 0})
            ids.append(r.json()["id"])
            produced += r.json()["usage"]["completion_tokens"]
        r = call(s, "POST", "/v1/completions", {"model": "alpha", "prompt": "The river", "max_tokens": 4,
                                                "stream": True})
        produced += 4
        s.cfg.max_concurrent = 0  # the next is turned away
        assert call(s, "POST", "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 429
        m = call(s, "GET", "/metrics")
    finally:
        s.close()
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = m.text
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')
    assert all(sample.match(ln) for ln in text.splitlines() if ln and not ln.startswith("#")), text

    def value(line_start):
        return float(next(ln for ln in text.splitlines() if ln.startswith(line_start)).rsplit(" ", 1)[1])

    assert value('llm_modules_requests_total{module="alpha",outcome="length"}') == 3
    assert value('llm_modules_requests_total{module="alpha",outcome="rejected"}') == 1
    assert value('llm_modules_generated_tokens_total{module="alpha"}') == produced == 12
    assert value('llm_modules_time_to_first_token_seconds_count{module="alpha"}') == 3
    assert value('llm_modules_time_per_output_token_seconds_count{module="alpha"}') == produced - 3
    assert value('llm_modules_time_to_first_token_seconds_bucket{le="+Inf",module="alpha"}') == 3
    assert value("llm_modules_queued_requests") == 0 and value("llm_modules_decode_steps_total") >= 5
    assert "# TYPE llm_modules_batch_rows histogram" in text
    for rid in ids:  # the id the client got, at arrival and at the end
        assert sum(rid in ln for ln in logs) == 2, logs
    assert any(re.fullmatch(rf"request {ids[0]} \(alpha\): length after 5 tokens in [0-9.]+ s", ln) for ln in logs)
