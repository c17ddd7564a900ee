"""`kvmem serve`: build the engine and the app, run uvicorn, shut down cleanly on SIGINT/SIGTERM.

Shutdown: SIGTERM first *drains* (server/drain.py: /health and new requests answer 503, requests in
flight run on) for up to `drain_timeout` seconds, ending as soon as nothing is in flight; SIGINT (and
SIGTERM with drain_timeout 0, or a second SIGTERM) skips that. Then the server stops accepting
connections; requests still in flight get `grace_s` seconds to finish, then are aborted (their
streams end with finish_reason "abort") and the process exits 0.
uvicorn by default re-raises the signal after its own shutdown, which would turn a clean stop into
a "killed by signal" exit status; `_GracefulServer` does not. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from types import FrameType

import uvicorn

from kvmem.config import EngineConfig
from kvmem.engine.async_engine import AsyncLLMEngine
from kvmem.engine.llm_engine import LLMEngine
from kvmem.progress import human_bytes
from kvmem.server.api_server import ServerSettings, build_app
from kvmem.server.connection import uvicorn_config
from kvmem.server.drain import Drain

logger = logging.getLogger(__name__)


class _GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace_s: float, drain: Drain | None = None,
                 drain_timeout: float = 0.0) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.drain = drain
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        elif (sig == signal.SIGTERM and self.drain is not None and self.drain_timeout > 0
              and not self.drain.draining):
            logger.info("SIGTERM: draining (new requests get 503; %d in flight may run for up to %g s)",
                        self.drain.in_flight, self.drain_timeout)
            self.drain.start()  # on_tick ends the drain
        else:
            self.should_exit = True  # and, unlike uvicorn, no re-raise of the signal afterwards

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s; True ends it (then `shutdown` runs).
        if self.drain is not None and self.drain.done(self.drain_timeout) and not self.should_exit:
            logger.info("drain over (%d requests still in flight)", self.drain.in_flight)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        # In-flight requests may finish within the grace period; then they are aborted, which ends
        # their streams and lets uvicorn's wait for open connections return.
        asyncio.get_running_loop().call_later(self.grace_s, self.engine.abort_all)
        await super().shutdown(sockets)


def api_key_from_env() -> str | None:
    """--api-key's default: $KVMEM_API_KEY, else vLLM's $VLLM_API_KEY (an empty value counts as unset)."""
    return os.environ.get("KVMEM_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def kv_capacity_lines(engine: LLMEngine) -> list[str]:
    """What vLLM says at start: the KV cache's size in tokens and how many requests of max_model_len
    tokens fit at once; and the strategy with its budget."""
    stats = engine.stats()
    budget = stats.bytes_capacity or stats.bytes_reserved
    tokens = budget // engine.manager.spec.bytes_per_token
    return [f"KV cache size: {tokens:,} tokens ({engine.kv_cache_strategy}, budget {human_bytes(budget)}, "
            f"{engine.manager.spec.bytes_per_token:,} bytes per token)",
            f"Maximum concurrency for {engine.max_model_len:,} tokens per request: "
            f"{tokens / engine.max_model_len:.2f}x"]


def serve(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | Sequence[str] | None = None, grace_s: float = 5.0, drain_timeout: float = 30.0,
          log_level: str = "info",
          log_requests: bool = True, log_stats: bool = True, stats_interval: float = 10.0,
          **settings_kwargs: object) -> int:
    """`served_model_name`: one name or several (the first is the one responses report; all are
    accepted and listed). `settings_kwargs`: the other `ServerSettings` fields (api_key, defaulting
    to the environment's; CORS; max_body_bytes, max_prompts_per_request, max_prompt_chars,
    health_step_timeout, request_read_timeout, timeout_keep_alive)."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [])
    if settings_kwargs.get("api_key") is None:
        settings_kwargs["api_key"] = api_key_from_env()
    for key in ("allowed_origins", "allowed_methods", "allowed_headers"):
        if key in settings_kwargs:
            settings_kwargs[key] = tuple(settings_kwargs[key])  # type: ignore[arg-type]
    settings = ServerSettings(served_model_name=names[0] if names else "", extra_model_names=tuple(names[1:]),
                              **settings_kwargs)  # bad limits: fail before loading
    # The engine is built on its own thread (see async_engine: one OpenMP team, not two).
    async_engine = AsyncLLMEngine(lambda: LLMEngine(engine_config), log_requests=log_requests,
                                  log_stats=log_stats, stats_interval=stats_interval)
    async_engine.start()
    engine = async_engine.engine
    name = names[0] if names else engine.model_config.name
    settings = dataclasses.replace(settings, served_model_name=name, model_path=str(engine_config.model or name))
    app = build_app(async_engine, settings)
    for line in kv_capacity_lines(engine):
        logger.info("%s", line)
    logger.info("serving %s (kv_cache=%s, dtype=%s, max_model_len=%d) on http://%s:%d/v1",
                ", ".join(settings.model_names), engine.kv_cache_strategy, str(engine.dtype).removeprefix("torch."),
                engine.max_model_len, host, port)
    # log_config=None: uvicorn's lines go through the root logger, timestamped like ours.
    config = uvicorn_config(app, settings, host=host, port=port, log_level=log_level, lifespan="on",
                            log_config=None, timeout_graceful_shutdown=int(grace_s) + 2,
                            access_log=log_level == "debug")
    if not drain_timeout >= 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout}")
    server = _GracefulServer(config, async_engine, grace_s, app.state.drain, drain_timeout)
    if engine.tp is not None:  # a tensor-parallel rank died: stop serving, exit non-zero (not hang)
        engine.tp.on_failure.append(lambda reason: setattr(server, "should_exit", True))
    server.run()
    async_engine.stop()  # in case the lifespan did not run (e.g. the port was taken)
    if engine.tp is not None and engine.tp.failure is not None:
        logger.error("exiting: %s", engine.tp.failure)
        return 1
    return 0 if server.started or server.should_exit else 1
