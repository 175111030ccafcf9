"""`podtrain launch local`: P real processes of one podtrain command on 127.0.0.1.

Each process joins one JAX job (see parallel/distributed.py) with D fake CPU devices, so a
multi-host run can be exercised on a laptop. Output is streamed line by line with a `[pN]`
prefix. If any process fails, the launcher terminates the others at once (their own JAX
heartbeat would also stop them, within the heartbeat timeout) and exits non-zero.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from podtrain.launch.submission import JOB_CONFIG, Submission, job_config
from podtrain.parallel import distributed
from podtrain.train.config import Config

TERMINATE_GRACE_S = 10  # after SIGTERM, how long a process may take before SIGKILL
POLL_S = 0.2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            out.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every running process, then SIGKILL those still running after the grace period."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LocalJob:
    """P running processes of one podtrain command; `wait()` watches them and returns the exit code."""

    def __init__(
        self,
        args: list[str],
        processes: int,
        devices_per_process: int,
        out=None,
        port: int = 0,
        heartbeat_s: int = distributed.HEARTBEAT_TIMEOUT_S,
    ):
        if processes < 1 or devices_per_process < 1:
            raise ValueError(f"processes={processes} and devices_per_process={devices_per_process} must be >= 1")
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        coordinator = f"127.0.0.1:{port or free_port()}"
        self.procs, self.threads = [], []
        for pid in range(processes):
            job = distributed.Job(coordinator, processes, pid, devices_per_process, heartbeat_s)
            env = {**os.environ, **job.env(), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(
                [sys.executable, "-m", "podtrain.launch.cli", *args],
                env=env,
                text=True,
                bufsize=1,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            thread = threading.Thread(target=_stream, args=(proc, f"[p{pid}]", self.out, self.lock), daemon=True)
            thread.start()
            self.procs.append(proc)
            self.threads.append(thread)

    def wait(self, stop_on_failure: bool = True) -> int:
        """Block until every process has exited; the first failure's exit code, or 0.

        With stop_on_failure the others are terminated as soon as one fails; without it they are
        left to notice on their own (the JAX heartbeat), which tests use.
        """
        try:
            code = self._watch(stop_on_failure)
        except KeyboardInterrupt:
            _stop(self.procs)
            code = 130
        for t in self.threads:
            t.join(timeout=5)
        return code

    def _watch(self, stop_on_failure: bool) -> int:
        first_failure = None
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                i, code = failed[0]
                first_failure = code if code > 0 else 128 - code  # killed by signal N reads as 128 + N
                self._say(f"process {i} exited with code {code}" + ("; stopping the others" if stop_on_failure else ""))
                if stop_on_failure:
                    _stop(self.procs)
            if all(c is not None for c in (p.poll() for p in self.procs)):
                return first_failure or 0
            time.sleep(POLL_S)

    def _say(self, message: str) -> None:
        with self.lock:
            self.out.write(f"[launch] {message}\n")
            self.out.flush()


def launch(args: list[str], processes: int, devices_per_process: int, out=None) -> int:
    """Run `podtrain <args>` as `processes` processes of one JAX job; 0, or the first failure's code."""
    return LocalJob(args, processes, devices_per_process, out).wait()


def submission(cfg: Config, stage: Path) -> Submission:
    """`podtrain submit --target local`: `podtrain launch local` of the staged job config."""
    path = stage / JOB_CONFIG
    cmd = [
        sys.executable,
        "-m",
        "podtrain.launch.cli",
        "launch",
        "local",
        "--processes",
        str(cfg.launch.local_processes),
        "--devices-per-process",
        str(cfg.launch.local_devices_per_process),
        "--",
        "pretrain",
        "--config",
        str(path),
    ]
    return Submission({path: job_config(cfg)}, [cmd], tool=sys.executable)
