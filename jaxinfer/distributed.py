"""Many processes, one mesh, on JAX's own multi-controller runtime.

Every process (one per GPU, or per host) calls `initialize` first, loads the same
model onto its own devices of the global mesh, and then runs the same jitted
device calls in the same order. Process 0 owns the scheduler (and the HTTP
server): before each device call its runner `announce`s the call (a fixed-size
header, then the call's packed inputs) with `broadcast_one_to_all`, itself a JAX
collective; the other processes sit in `follow`, receive it and make the same
call. While the engine idles, process 0 announces a no-op now and then so that no
collective waits long enough to time out.

A process that dies takes the group down: the launcher (`scripts/launch_mesh.py`)
stops the others and says which one died; across hosts, JAX's heartbeat ends the
survivors' collectives with an error.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

HEADER = 9  # int32: kind, payload length, then the kind's own fields
STEP, PENALTIES, NOOP, STOP, EDITS = range(5)


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the process group (before any other JAX call). CPU collectives go over gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info("process %d of %d joined %s: %d local devices, %d in all", process_id, num_processes, coordinator,
             jax.local_device_count(), jax.device_count())


def announce(kind: int, fields=(), payload: np.ndarray | None = None) -> None:
    """From process 0: tell the others which device call comes next, and its inputs."""
    if jax.process_count() == 1:
        return
    payload = np.zeros(0, np.int32) if payload is None else np.ascontiguousarray(payload, np.int32).reshape(-1)
    header = np.zeros(HEADER, np.int32)
    header[:2 + len(fields)] = [kind, payload.size, *fields]
    multihost_utils.broadcast_one_to_all(header)
    if payload.size:
        multihost_utils.broadcast_one_to_all(payload)


def receive() -> tuple[int, np.ndarray, np.ndarray]:
    """On the other processes: the next (kind, fields, payload) process 0 announces."""
    header = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(HEADER, np.int32)))
    kind, size = int(header[0]), int(header[1])
    payload = np.zeros(size, np.int32)
    if size:
        payload = np.asarray(multihost_utils.broadcast_one_to_all(payload))
    return kind, header[2:], payload


def follow(runner) -> None:
    """Processes other than 0: make every device call process 0 makes, until it announces STOP."""
    log.info("process %d follows process 0's steps", jax.process_index())
    while True:
        kind, fields, payload = receive()
        if kind == STOP:
            log.info("process %d: process 0 stopped the group", jax.process_index())
            return
        if kind == STEP:
            runner.replay_step(fields, payload)
        elif kind == PENALTIES:
            runner.replay_penalties(fields, payload)
        elif kind == EDITS:
            runner.replay_edits(fields, payload)
