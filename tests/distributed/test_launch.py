"""Placing ranks, and one replica over two "machines": two processes on 127.0.0.1, node 1 started
with `kvmem serve --node-rank 1` as on a second host, node 0 the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvmem import LLM, SamplingParams
from kvmem.distributed.group import free_local_init_method
from kvmem.distributed.launch import split_cores
from tests.oracle import hf_greedy, make_tiny_model

PROMPTS = [[5, 17, 42, 99, 3, 250, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]
GREEDY = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)


@pytest.mark.parametrize("groups,cores,expected", [
    (2, [0, 1], [[0], [1]]),
    (2, [0, 1, 2, 3, 4], [[0, 1, 2], [3, 4]]),
    (3, [4, 5, 6, 7, 8, 9], [[4, 5], [6, 7], [8, 9]]),
    (3, [0, 1], [[0], [1], [0]]),  # more ranks than cores: they share, round robin
])
def test_cores_split_into_disjoint_groups(groups, cores, expected):
    assert split_cores(groups, cores) == expected


def test_two_nodes_on_one_host_serve_the_same_tokens(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama3-gqa")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p, 16) for p in PROMPTS]
    init = free_local_init_method()
    flags = ["--tensor-parallel-size", "2", "--nnodes", "2", "--distributed-init-method", init]
    # Node 1 first, as an operator might: it waits for node 0 (rank 0) to come up.
    node1 = subprocess.Popen([sys.executable, "-m", "kvmem.cli", "serve", str(model), "--node-rank", "1", *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(str(model), dtype="float32", kv_cache_memory="1MiB", tensor_parallel_size=2, nnodes=2,
                  node_rank=0, distributed_init_method=init)
        try:
            assert llm.engine.tp.processes == []  # node 0 hosts rank 0 only: no local worker
            outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outputs] == expected
            ranks = llm.engine.tp.rank_stats()
            assert len(ranks) == 2 and all(s.bytes_allocated == 0 for s, _ in ranks)
        finally:
            llm.close()
        assert node1.wait(timeout=120) == 0, node1.communicate()[0]  # rank 0 closed: node 1 ends cleanly
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.communicate()


def test_a_worker_node_needs_to_know_where_rank_0_is(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    done = subprocess.run([sys.executable, "-m", "kvmem.cli", "serve", "--tensor-parallel-size", "2", "--nnodes", "2",
                           "--node-rank", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "distributed_init_method" in done.stderr
