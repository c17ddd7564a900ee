from __future__ import annotations

import pytest

from kvmem.fleet.launcher import FleetConfig, split_serve_args
from kvmem.fleet.router import kv_event_args, router_argv


def test_router_command_line_has_the_workers_policy_and_overrides_last():
    argv = router_argv(["http://a:1", "http://b:2"], "round_robin", "127.0.0.1", 9000, 9100,
                       ["--health-check-interval-secs", "7"])
    assert argv[1:3] == ["-m", "vllm_router.launch_router"]
    assert argv[argv.index("--worker-urls") + 1:argv.index("--policy")] == ["http://a:1", "http://b:2"]
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--port") + 1] == "9000" and argv[argv.index("--prometheus-port") + 1] == "9100"
    assert argv[-2:] == ["--health-check-interval-secs", "7"]  # after the defaults: it wins


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="--policy"):
        router_argv(["http://a:1"], "fastest", "127.0.0.1", 9000, 9100)


def test_fleet_flags_and_serve_flags_split_at_double_dash():
    assert split_serve_args(["fleet", "--replicas", "2", "--", "--kv-cache", "static"]) == (
        ["fleet", "--replicas", "2"], ["--kv-cache", "static"])
    assert split_serve_args(["fleet"]) == (["fleet"], [])


@pytest.mark.parametrize("kwargs, message", [({"replicas": 0}, "--replicas"),
                                             ({"worker_urls": ["http://a:1"], "router": False}, "--no-router"),
                                             ({"startup_timeout": 0}, "--startup-timeout"),
                                             ({"policy": "kv_aware", "serve_args": ["--kv-events-config", "{}"]},
                                              "--kv-events-config"),
                                             ({"policy": "kv_aware", "worker_urls": ["http://a:1"]},
                                              "--kv-event-source")])
def test_bad_fleet_config_is_a_value_error_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FleetConfig(**kwargs)


def test_kvmem_fleet_that_cannot_start_is_an_error_exit(capsys):
    from kvmem.cli import main

    assert main(["fleet", "--replicas", "2", "--cores-per-replica", "4096", "--", "--kv-cache", "paged"]) == 2
    assert "kvmem: error:" in capsys.readouterr().err


def test_kv_aware_router_flags_name_each_workers_events_block_size_and_model():
    args = kv_event_args({"http://a:1": "tcp://a:5001", "http://b:2": "tcp://b:5002"}, 16, "m")
    assert args == ["--kv-event-source", "http://a:1=tcp://a:5001", "--kv-event-source", "http://b:2=tcp://b:5002",
                    "--kv-event-block-size", "16", "--kv-event-model", "m"]
    assert "kv_aware" in router_argv(["http://a:1"], "kv_aware", "127.0.0.1", 9000, 9100, args)
