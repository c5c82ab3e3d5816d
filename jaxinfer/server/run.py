"""`jaxinfer serve`: uvicorn runs the app at once; the engine loads and warms up beside it.

`/health` answers 503 until warm-up is done, then 200. SIGTERM (or Ctrl-C) stops
admission (503), lets in-flight requests finish for up to `--shutdown-timeout`
seconds, then exits 0; a second signal exits at once. If the engine fails, the
affected requests get errors, `/health` turns 503 and the process exits 1
rather than hang.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import uvicorn

from jaxinfer.config import EngineConfig
from jaxinfer.server.app import Server, ServerConfig, build_app

log = logging.getLogger("jaxinfer.serve")
DEFAULT_MODEL_NAME = "jaxinfer-default"  # the embedded model's served name


class _Uvicorn(uvicorn.Server):
    """uvicorn with our drain on the first signal instead of its immediate close (and no re-raised signal,
    so a drained server exits 0)."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.app_server, self.exit_code = server, 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._signalled or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._signalled = True
        log.info("signal %d: refusing new requests and draining", sig)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        if self.app_server.engine is not None:
            await self.app_server.drain()
        self.should_exit = True

    def fatal(self) -> None:
        """From any thread: exit 1 shortly (error responses in flight get out first)."""
        self.exit_code = 1
        threading.Timer(0.5, setattr, (self, "should_exit", True)).start()


def _load(server: Server, model, engine_config: EngineConfig, warmup: bool, step_log: str | None) -> None:
    import jax

    from jaxinfer.llm import load_engine
    try:
        start = time.perf_counter()
        engine = load_engine(model, engine_config)
        loaded = time.perf_counter()
        log.info("loaded the model in %.1fs (%d KV pages of %d tokens)", loaded - start, engine.cfg.num_pages,
                 engine.cfg.page_size)
        if warmup:
            runner = engine.executor.runner
            runner.warmup()
            log.info("warm-up: %d step shapes compiled in %.1fs", runner.num_compiles, time.perf_counter() - loaded)
        if step_log is not None:
            from jaxinfer.bench import machine
            from jaxinfer.planner.steplog import StepLog, log_header
            engine.executor = StepLog(engine.executor, engine.cfg, step_log,
                                      log_header(engine.cfg, engine.model_config, machine()))
        engine.start()
        server.ready(engine)
        log.info("ready: /health is 200 after %.1fs", time.perf_counter() - start)
        if warmup and engine.cfg.control_flow == "static" and jax.process_count() == 1:
            threading.Thread(target=runner.warmup_rest, name="jaxinfer-warmup-rest", daemon=True).start()
    except Exception:
        log.exception("loading the model failed")
        server.fail("loading failed")


def serve(model, engine_config: EngineConfig, config: ServerConfig, host: str, port: int,
          warmup: bool = True, log_level: str = "info", step_log: str | None = None) -> int:
    """Run until a signal or an engine failure; -> the exit status. `step_log`: a path for the step log
    (jaxinfer/planner/steplog.py)."""
    server = Server(config)
    uv = _Uvicorn(uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=5, lifespan="on"), server)
    server.on_fatal = uv.fatal
    loader = threading.Thread(target=_load, args=(server, model, engine_config, warmup, step_log), daemon=True,
                              name="jaxinfer-load")
    loader.start()
    try:
        uv.run()
    finally:
        if server.engine is not None:
            server.engine.shutdown()
            server.engine.executor.runner.close()  # with several processes: release the others
            if step_log is not None:
                server.engine.executor.close()
    log.info("stopped (exit status %d)", uv.exit_code)
    return uv.exit_code
