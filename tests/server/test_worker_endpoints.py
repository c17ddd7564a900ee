"""What a router reads from a worker (vLLM's and SGLang's routers): /get_load, /get_server_info, and
the neutral SGLang sampling fields they add to every request they forward."""

from __future__ import annotations

import httpx

# What vllm-router 0.1.17 added to the bodies it forwarded (seen on the wire, docs in fleet/router.py).
ROUTER_COMPLETION_FIELDS = {"stream": False, "echo": False, "no_stop_trim": False, "ignore_eos": False,
                            "skip_special_tokens": True, "return_hidden_states": False}
ROUTER_CHAT_FIELDS = {"stream": False, "logprobs": False, "no_stop_trim": False, "ignore_eos": False,
                      "continue_final_message": False, "skip_special_tokens": True, "separate_reasoning": True,
                      "stream_reasoning": True, "return_hidden_states": False, "include_reasoning": True}


def test_get_load_reports_running_waiting_and_kv_usage(tiny_server):
    load = httpx.get(f"{tiny_server.base_url}/get_load", timeout=60).json()
    assert load == {"load": 0, "num_running_reqs": 0, "num_waiting_reqs": 0, "kv_cache_usage": 0.0,
                    "http_requests_in_flight": 0, "draining": False}


def test_get_server_info_names_the_model_and_block_size(tiny_server):
    info = httpx.get(f"{tiny_server.base_url}/get_server_info", timeout=60).json()
    assert info["served_model_name"] == tiny_server.model
    assert info["kv_block_size"] == 16 and info["kv_cache"] == "paged"
    assert info["max_model_len"] == tiny_server.engine.max_model_len and info["draining"] is False


def test_bodies_a_router_forwards_give_the_same_tokens_as_plain_ones(tiny_server):
    url = tiny_server.base_url
    plain = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}
    a = httpx.post(f"{url}/v1/completions", json=plain, timeout=120)
    b = httpx.post(f"{url}/v1/completions", json={**plain, **ROUTER_COMPLETION_FIELDS}, timeout=120)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    a = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=120)
    b = httpx.post(f"{url}/v1/chat/completions", json={**chat, **ROUTER_CHAT_FIELDS}, timeout=120)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]


def test_router_fields_that_would_change_the_output_are_still_refused(tiny_server):
    body = {"prompt": "x", "max_tokens": 2, "no_stop_trim": True}
    response = httpx.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "no_stop_trim"
