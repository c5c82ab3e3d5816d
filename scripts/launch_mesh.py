"""Start `jaxinfer serve` as one JAX process per GPU (or per group of CPU devices) on one global mesh.

One host, 8 GPUs, tensor parallel 8 (process 0 serves HTTP on port 8000):

    python scripts/launch_mesh.py --processes 8 -- --model /models/llama-3-70b -tp 8 --port 8000

Two hosts x 8 GPUs: the same command on each host, naming the hosts and this host's index; the
coordinator runs on the first host, process ids are host_index * processes + local index:

    python scripts/launch_mesh.py --hosts 10.0.0.1,10.0.0.2 --host-index 0 --processes 8 -- -tp 8 -dp 2 ...

On CPU (tests, trying it out) `--devices-per-process N` gives each process N fake devices.

The launcher keeps the group together: if any of its processes exits while the others run, it says which
one died and with what status, stops the others (SIGTERM, then SIGKILL after --grace seconds) and exits
non-zero. SIGTERM or Ctrl-C to the launcher goes to process 0, which drains its HTTP requests and
releases the others; the launcher then exits with process 0's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="processes on this host")
    parser.add_argument("--hosts", default="127.0.0.1", help="comma-separated hosts; the first runs the coordinator")
    parser.add_argument("--host-index", type=int, default=0)
    parser.add_argument("--coordinator-port", type=int, default=8476)
    parser.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="GPUs (or, on CPU, fake devices) each process drives")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    hosts = args.hosts.split(",")
    if not 0 <= args.host_index < len(hosts):
        parser.error(f"--host-index {args.host_index} is not an index of --hosts ({len(hosts)} hosts)")
    return args, argv[split + 1:]


def commands(args: argparse.Namespace, serve_args: list[str]) -> list[tuple[list[str], dict]]:
    """(command, environment) of each local process."""
    hosts = args.hosts.split(",")
    total = args.processes * len(hosts)
    coordinator = f"{hosts[0]}:{args.coordinator_port}"
    out = []
    for local in range(args.processes):
        process_id = args.host_index * args.processes + local
        env = dict(os.environ)
        if args.platform == "cpu":
            env.update(JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
                                 f"{args.devices_per_process}".strip())
        else:
            first = local * args.devices_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(args.devices_per_process))
        command = [sys.executable, "-m", "jaxinfer.cli", "-v", "serve", *serve_args,
                   "--coordinator-address", coordinator, "--num-processes", str(total),
                   "--process-id", str(process_id)]
        out.append((command, env))
    return out


def stop_all(processes: list[subprocess.Popen], grace: float) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def supervise(processes: list[subprocess.Popen], ids: list[int], grace: float) -> int:
    """Wait for the group; -> the launcher's exit status. A process exiting 0 was released by process 0's
    STOP (or is process 0 after draining): the others follow it out. Any other exit stops the group."""
    signal.signal(signal.SIGTERM, lambda *_: processes[0].send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: processes[0].send_signal(signal.SIGTERM))
    clean_since = None
    while any(p.poll() is None for p in processes):
        for p, process_id in zip(processes, ids):
            status = p.poll()
            if status not in (None, 0):
                running = sum(q.poll() is None for q in processes)
                print(f"launch_mesh: process {process_id} (pid {p.pid}) exited with status {status}; stopping the "
                      f"other {running}", file=sys.stderr, flush=True)
                stop_all(processes, grace)
                return status if status > 0 else 1
            if status == 0 and clean_since is None:
                clean_since = time.monotonic()
        if clean_since is not None and time.monotonic() - clean_since > grace:
            stop_all(processes, grace)  # released, but not leaving: make sure
        time.sleep(0.2)
    return max(p.returncode for p in processes)


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse(sys.argv[1:] if argv is None else argv)
    started = [(subprocess.Popen(command, env=env), command) for command, env in commands(args, serve_args)]
    processes = [p for p, _ in started]
    ids = [args.host_index * args.processes + i for i in range(args.processes)]
    return supervise(processes, ids, args.grace)


if __name__ == "__main__":
    sys.exit(main())
