"""The HTTP APIs of a real velod serving a tiny GGUF, through the official ``openai`` and
``ollama`` Python clients, plain HTTP where the clients hide what is checked, and a /metrics
scrape parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import wait_for

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache": "32MiB", "max_batch_size": 16}
NO_EOS = {"ignore_eos": True}  # random weights may pick the end-of-text token anywhere


def start(velod_factory: Any, model: Path, http: dict[str, Any] | None = None,
          engine: dict[str, Any] | None = None) -> tuple[Any, str]:
    port = free_port()
    d = velod_factory({"engine": {**ENGINE, **(engine or {})},
                       "http": {"listen": f"127.0.0.1:{port}", **(http or {})}})
    d.ctl("engine", "load", str(model))
    return d, f"http://127.0.0.1:{port}"


@pytest.fixture
def served(velod_factory, tiny_llm_gguf):
    return start(velod_factory, tiny_llm_gguf)


@pytest.fixture
def oai(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------------------- OpenAI


def test_openai_chat_completion_reports_text_usage_and_finish_reason(oai, tiny_llm_gguf):
    reply = oai.chat.completions.create(model="tiny-llama", max_tokens=7, seed=1,
                                        messages=[{"role": "user", "content": "Hello"}],
                                        extra_body=NO_EOS)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens > 2
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7
    assert [m.id for m in oai.models.list().data] == [str(tiny_llm_gguf)]


def test_openai_stream_joins_to_the_same_text_and_ends_with_usage(oai):
    kwargs = {"model": "tiny-llama", "max_tokens": 12, "temperature": 0,
              "messages": [{"role": "user", "content": "Tell me"}], "extra_body": NO_EOS}
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12


def test_openai_completion_stop_string_cuts_the_text(oai):
    base = oai.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=24,
                                  temperature=0, extra_body=NO_EOS)
    text = base.choices[0].text
    half = text[len(text) // 2:]  # a random model's text: take two visible characters
    stop = next((half[i:i + 2] for i in range(len(half) - 1)
                 if all(c.isprintable() and not c.isspace() for c in half[i:i + 2])), "")
    assert stop, text
    cut = oai.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=24,
                                 temperature=0, stop=[stop], extra_body=NO_EOS)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.usage.completion_tokens < 24


def test_openai_logprobs_give_the_chosen_token_and_its_alternatives(oai):
    reply = oai.chat.completions.create(model="tiny-llama", max_tokens=4, logprobs=True,
                                        top_logprobs=3, temperature=0, extra_body=NO_EOS,
                                        messages=[{"role": "user", "content": "Hi"}])
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_openai_errors_come_in_openai_shape_with_the_right_status(oai, served):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny-llama", n=2,
                                    messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny-llama", prompt=[5 + i % 800 for i in range(5000)])
    assert "context holds 4096" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="tiny-llama", temperature=-1,
                                    messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "temperature"
    raw = httpx.post(served[1] + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]


# ---------------------------------------------------------------------------- Ollama


def test_ollama_generate_and_chat_with_ollama_field_names(served):
    client = ollama.Client(host=served[1])
    reply = client.generate(model="tiny-llama", prompt="Hi", options={"num_predict": 6,
                                                                       "seed": 3})
    assert reply.done and reply.done_reason in ("length", "stop")
    assert reply.eval_count == 6 or reply.done_reason == "stop"
    assert reply.prompt_eval_count > 1 and reply.eval_duration > 0
    assert 0 < reply.prompt_eval_duration < reply.total_duration  # nanoseconds
    parts = list(client.chat(model="tiny-llama", stream=True, options={"num_predict": 8},
                             messages=[{"role": "user", "content": "Hello"}]))
    final = parts[-1]
    assert final.done and not any(p.done for p in parts[:-1])
    assert final.eval_count == 8 or final.done_reason == "stop"
    assert all(p.message.role == "assistant" for p in parts)


def test_ollama_raw_generate_equals_the_openai_completion_of_the_same_prompt(served, oai):
    client = ollama.Client(host=served[1])
    raw = client.generate(model="tiny-llama", prompt="Once", raw=True,
                          options={"num_predict": 5, "temperature": 0})
    completion = oai.completions.create(model="tiny-llama", prompt="Once", max_tokens=5,
                                        temperature=0)
    assert raw.response == completion.choices[0].text


def test_ollama_listing_endpoints_describe_the_loaded_model(served, tiny_llm_gguf):
    client = ollama.Client(host=served[1])
    names = [m.model for m in client.list().models]
    assert names == [str(tiny_llm_gguf)]
    assert [m.model for m in client.ps().models] == names
    shown = client.show("tiny-llama")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 2
    assert shown.modelinfo["llama.attention.head_count_kv"] == 2
    assert httpx.get(served[1] + "/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llama3:70b", prompt="x")
    assert info.value.status_code == 404 and "not found" in info.value.error


# ---------------------------------------------------------------------------- metrics


def test_metrics_parse_and_counters_move_as_requests_are_served(served, oai):
    url = served[1]
    before = scrape(url)
    oai.completions.create(model="tiny-llama", prompt="Hi", max_tokens=9, extra_body=NO_EOS)
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("velod_engine_generation_tokens_total") == 9
    assert moved("velod_engine_requests_total", finish_reason="length") == 1
    assert moved("velod_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("velod_engine_time_to_first_token_seconds_count") == 1
    assert after[("velod_engine_kv_blocks", ())] > 0
    assert after[("velod_component_state", (("component", "engine"), ("state", "running")))] == 1
    assert after[("process_resident_memory_bytes", ())] > 0


# ---------------------------------------------------------------------------- limits


def test_status_shows_the_url_and_health_answers(served):
    d, url = served
    assert f"serving {url}" in d.ctl("status").stdout and "connection" in d.ctl("status").stdout
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": str(
        d.call("engine.status")["model"]["name"]), "engine": "idle"}  # load allocated the pool


def test_body_larger_than_the_limit_is_413_in_the_api_shape(velod_factory, tiny_llm_gguf):
    _, url = start(velod_factory, tiny_llm_gguf, {"max_body_size": "1KiB"})
    big = {"model": "tiny-llama", "prompt": "x" * 4096}
    answer = httpx.post(url + "/v1/completions", json=big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large"
    answer = httpx.post(url + "/api/generate", json=big)
    assert answer.status_code == 413 and "error" in answer.json()


def test_full_queue_is_503_with_retry_after(velod_factory, tiny_llm_gguf):
    d, url = start(velod_factory, tiny_llm_gguf, {"retry_after": "3s"},
                   {"max_batch_size": 1, "max_waiting": 1})
    long = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3000, "ignore_eos": True}
    threads = [threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                kwargs={"json": long, "timeout": 60}) for _ in range(2)]
    # One at a time: a request waits until a step admits it, so two sent together could
    # both be waiting and the second refused before the queue looks as this test needs.
    threads[0].start()
    wait_for(lambda: d.call("engine.status")["running"] == 1, what="one running")
    threads[1].start()
    wait_for(lambda: d.call("engine.status")["waiting"] == 1, what="one running, one queued")
    answer = httpx.post(url + "/v1/completions", json=long)
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "3"
    assert answer.json()["error"]["type"] == "rate_limit_error"
    d.call("engine.abort", {"all": True})
    for t in threads:
        t.join(30)


def test_client_that_disconnects_mid_stream_aborts_its_sequence(served):
    d, url = served
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/api/generate", json.dumps({
        "model": "tiny-llama", "prompt": "x", "raw": True,
        "options": {"num_predict": 100000}}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.readline())["done"] is False
    conn.close()
    status = wait_for(lambda: (s := d.call("engine.status"))["running"] == 0 and s,
                      timeout=10, what="the abandoned sequence to be aborted")
    assert status["aborted"] == 1 and status["pool"]["blocks_used"] == 0


def test_request_past_its_timeout_is_aborted_with_504(velod_factory, tiny_llm_gguf):
    d, url = start(velod_factory, tiny_llm_gguf, {"request_timeout": "300ms"})
    answer = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": "tiny-llama", "prompt": "x", "max_tokens": 4000, "ignore_eos": True})
    assert answer.status_code == 504 and "http.request_timeout" in answer.text
    status = wait_for(lambda: (s := d.call("engine.status"))["running"] == 0 and s,
                      what="the timed-out sequence to be aborted")
    assert status["aborted"] == 1


def test_api_key_is_required_when_configured_and_health_stays_open(velod_factory,
                                                                     tiny_llm_gguf, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-token\n")
    _, url = start(velod_factory, tiny_llm_gguf, {"api_key_file": str(key_file)})
    anonymous = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.get(url + "/metrics").status_code == 401
    allowed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-token", max_retries=0)
    assert allowed.models.list().data
    assert httpx.get(url + "/health").status_code == 200


def test_unix_socket_listening_serves_the_same_api(velod_factory, tiny_llm_gguf, tmp_path):
    path = tmp_path / "http.sock"
    d = velod_factory({"engine": ENGINE, "http": {"listen": str(path)}})
    d.ctl("engine", "load", str(tiny_llm_gguf))
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=30)
    reply = client.post("http://velod/api/generate", json={
        "model": "tiny-llama", "prompt": "Hi", "stream": False, "options": {"num_predict": 3}})
    assert reply.status_code == 200 and reply.json()["done"] is True
    assert f"http+unix://{path}" in d.ctl("status").stdout


def test_http_listen_change_is_applied_on_reload(served, velod_factory):
    d, url = served
    port = free_port()
    config = json.loads(json.dumps(d.call("config.get")["config"]))
    config["http"]["listen"] = f"127.0.0.1:{port}"
    d.write_config(config)
    d.ctl("reload")
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200,
             what="the new address to answer")
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


@pytest.mark.real_model
def test_gemma_answers_a_chat_through_the_openai_client(velod_factory, gemma_gguf):
    _, url = start(velod_factory, gemma_gguf, engine={"kv_cache": "64MiB"})
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                           timeout=300)
    started = time.monotonic()
    reply = client.chat.completions.create(
        model=gemma_gguf.name, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert time.monotonic() - started < 120
    assert reply.choices[0].message.content and reply.usage.prompt_tokens == 16


def test_velodctl_bench_measures_the_engine_through_its_own_ollama_api(served):
    d, url = served
    result = json.loads(d.ctl("bench", "--url", url, "--prompt", "chat", "--gen", "6",
                              "--repeat", "1", "--concurrency", "1,2", "--json",
                              timeout=120).stdout)
    assert result["complete"] is True and result["error"] is None
    assert result["server"]["url"] == url and result["server"]["kind"] == "ollama"  # its API
    cases = {case["concurrency"]: case for case in result["cases"]}
    assert set(cases) == {1, 2}
    assert all(case["metrics"]["gen_tps"]["median"] > 0 for case in cases.values())
    listed = d.call("bench.list", {"limit": 5})["results"]
    assert listed[0]["id"] == result["id"]  # saved beside Ollama's results, same tool
