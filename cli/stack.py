"""The local stack behind `hydra-ablate serve`: embedded Redis (when REDIS_URL is unset), the API, Celery workers.

Each part is a child process; `Stack.stop` ends them in reverse order so that no job message is lost.

On one machine the API and the workers share the cores, and two settings keep requests fast while jobs run:
- `HYDRA_API_PROCESSES` (default 2, at most the CPU count): API processes on the one port (service/api/serve.py: each
  binds it with SO_REUSEPORT and the kernel spreads connections among them; Linux only, else one). Their HTTP
  latency metrics are shared through `PROMETHEUS_MULTIPROC_DIR` (a folder of the data dir, emptied at start).
- `HYDRA_WORKER_NICE` (default 10, 0 to turn off): the workers run at this lower CPU priority (their session's
  autogroup too, which is what Linux schedules by), so a burst of requests is answered first and jobs take the
  cycles it leaves. Jobs are not slower on an otherwise idle machine.

The stack is one user's, and ends with `serve` however `serve` ends:
- The embedded Redis is private (service/core/embedded_redis.py): a random password that reaches the children
  in their environment (REDIS_URL), never on a command line; administrative commands switched off.
- Every child gets SIGTERM from the kernel when `serve` dies, and a watchdog (cli/lifeline.py) ends their process
  groups (Celery's pool too) if `serve` is gone without stopping them, SIGKILL after a few seconds.
- `serve` stops (exit code 1) when its Redis dies, as when any other child does; the API's /health answers 503
  meanwhile (HYDRA_HEALTH_CHECKS_REDIS, which the stack turns on).
- The data folder is locked for the stack's lifetime (cli/data_lock.py): a second `serve` on it is refused.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cli.data_lock import DataDirLock
from cli.lifeline import Guard, die_with_parent
from service.api.serve import REUSE_PORT
from service.core.embedded_redis import EmbeddedRedis
from service.core.queue import webhook_queue
from service.core.redaction import redact
from service.core.settings import env_bool, env_int, env_raw

log = logging.getLogger("hydra-ablate")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ALLOW_REMOTE_NO_AUTH = "HYDRA_ALLOW_REMOTE_NO_AUTH"


def auth_off(env: dict[str, str]) -> bool:
    """Whether the API of a stack started with `env` runs without access control (the embedded default)."""
    default = "off" if not env.get("REDIS_URL") else "on"
    return not env_bool("HYDRA_AUTH", default == "on", env)


def check_exposure(host: str, env: dict[str, str], allow: bool = False) -> None:
    """Refuse to listen beyond loopback with auth off: every job would be open to the whole network.

    Allowed only when asked for explicitly (`serve --allow-remote-without-auth` or HYDRA_ALLOW_REMOTE_NO_AUTH=1).
    """
    if host in LOOPBACK_HOSTS or not auth_off(env):
        return
    if allow or env_bool(ALLOW_REMOTE_NO_AUTH, False, env):
        log.warning("listening on %s with auth off: anyone who can reach this port can read and cancel every job", host)
        return
    raise ValueError(
        f"refusing to listen on {host} with auth off (REDIS_URL unset: the embedded single-user setup, or "
        "HYDRA_AUTH=off): anyone on the network could read and cancel every job. Listen on 127.0.0.1, or turn auth "
        "on (set REDIS_URL and HYDRA_AUTH=on, then `hydra-ablate keys create NAME`), or pass "
        f"--allow-remote-without-auth (or set {ALLOW_REMOTE_NO_AUTH}=1) if this network is yours alone"
    )


def default_data_dir() -> Path:
    return Path(env_raw("HYDRA_DATA_DIR") or Path.home() / ".cache" / "hydra-ablate")


def default_api_processes() -> int:
    wanted = env_int("HYDRA_API_PROCESSES", 2)
    return min(wanted, os.cpu_count() or 1) if REUSE_PORT else 1


def default_worker_nice() -> int:
    return env_int("HYDRA_WORKER_NICE", 10, minimum=0)


@dataclass
class Stack:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    data_dir: Path = field(default_factory=default_data_dir)
    api_processes: int = field(default_factory=default_api_processes)
    worker_nice: int = field(default_factory=default_worker_nice)
    redis: EmbeddedRedis | None = None
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    lock: DataDirLock | None = None
    guard: Guard | None = None

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, allow_remote_without_auth: bool = False) -> None:
        env = dict(os.environ)
        # This terminal shows the stack's own log and the CLI's progress bar: no line per HTTP request (every poll
        # of a job would print one) unless asked for; the worker's model loading is quiet anyway (model_cache).
        env.setdefault("HYDRA_ACCESS_LOG", "off")
        check_exposure(self.host, env, allow_remote_without_auth)
        self.lock = DataDirLock.acquire(self.data_dir, self.host, self.port)  # DataDirInUse names the holder
        self.guard = Guard()
        env.setdefault("HYDRA_HEALTH_CHECKS_REDIS", "on")
        if not env.get("REDIS_URL"):
            self.redis = EmbeddedRedis(
                data_dir=self.data_dir / "redis", private=True, preexec=die_with_parent(), pass_fds=(self.lock.fd,)
            )
            self.redis.start()
            if self.redis.pid is not None:
                self.guard.watch(self.redis.pid)
            env["REDIS_URL"] = self.redis.url
            # The embedded default is a single-user local setup: the only case where auth may be off.
            env.setdefault("HYDRA_AUTH", "off")
            env.setdefault("HYDRA_ALLOW_NO_AUTH", "1")
            log.info(
                "embedded Redis listening on 127.0.0.1:%d, password-protected (append-only file in %s)",
                self.redis.port, self.redis.data_dir,
            )  # fmt: skip
        else:
            log.info("using Redis at %s", redact(env["REDIS_URL"]))
        api_env = dict(env)
        if self.api_processes > 1:
            api_env["PROMETHEUS_MULTIPROC_DIR"] = str(shared_metrics_dir(self.data_dir))
        api = [sys.executable, "-m", "service.api.serve", self.host, str(self.port), "warning"]
        for index in range(self.api_processes):
            self._spawn(f"api {index}" if self.api_processes > 1 else "api", api, api_env)
        log.info(
            "API listening on %s (OpenAPI at %s/schema; %d process%s)",
            self.api_url, self.api_url, self.api_processes, "es" if self.api_processes > 1 else "",
        )  # fmt: skip
        for index in range(self.workers):
            command = [
                sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "-Q", env.get("HYDRA_QUEUE", "hydra"), "-c", "1", "-n", f"hydra{index}@%h", "--loglevel", "INFO",
            ]  # fmt: skip
            self._spawn(f"worker {index}", command, env, nice=self.worker_nice)
            log.info("worker %d started (Celery, 1 process, nice %d)", index, self.worker_nice)
        if self.workers:
            # Webhooks are delivered by a worker of their own (threads, no model), never by one that runs chunks.
            hooks = webhook_queue(env.get("HYDRA_QUEUE", "hydra"))
            command = [
                sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                "-Q", hooks, "-P", "threads", "-c", "4", "-n", "webhooks@%h", "--loglevel", "INFO",
            ]  # fmt: skip
            self._spawn("webhooks", command, env)
            log.info("webhook worker started (Celery, 4 threads, queue %s)", hooks)

    def _spawn(self, name: str, command: list[str], env: dict[str, str], nice: int = 0) -> None:
        # Own session: Ctrl-C reaches only this process, which then stops the children in order. The session's
        # process group is what the guard ends should this process die without stopping them.
        # The preexec_fn only calls prctl: no lock is taken between fork and exec.
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent())
        self.processes.append((name, process))
        if self.guard is not None:
            self.guard.watch(process.pid)
        lower_priority(process.pid, nice)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /ready says Redis and at least one worker answer, and the workers advertised their models."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.api_url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    if client.get("/ready").status_code == 200 and client.get("/v1/models").json():
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"the stack was not ready within {timeout_s:.0f}s")

    def check_alive(self) -> None:
        if self.redis is not None and (code := self.redis.exit_code()) is not None:
            raise RuntimeError(
                f"the embedded Redis exited with code {code} (see {self.redis.data_dir / 'redis.log'}); "
                "stopping the API and the workers, which cannot run without it"
            )
        for name, process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode}")

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 30 s; killing it", name)
                process.kill()
                process.wait()
            if self.guard is not None:
                self.guard.forget(process.pid)
        self.processes.clear()
        if self.redis is not None:
            pid = self.redis.pid
            self.redis.stop()
            if self.guard is not None and pid is not None:
                self.guard.forget(pid)
            self.redis = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        log.info("stopped")

    def run_until_signal(self) -> None:
        """Block until Ctrl-C or SIGTERM (or a child dies), then stop everything."""
        stopping = {"now": False}

        def request_stop(signum: int, _frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stopping["now"] = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stopping["now"]:
                self.check_alive()
                time.sleep(0.2)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def shared_metrics_dir(data_dir: Path) -> Path:
    """An empty folder for the API processes' shared metrics (prometheus-client's multiprocess mode)."""
    folder = data_dir / "api-metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # a previous run's processes
        stale.unlink()
    return folder


def lower_priority(pid: int, nice: int) -> None:
    """Run process `pid` (just started, in a session of its own) and what it forks at CPU priority `nice`.

    Linux schedules each session's autogroup as one unit (/proc/PID/autogroup), so the autogroup's nice value is
    set as well; where that file is missing or not writable only the process's own value changes."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except OSError as error:
        log.warning("could not lower the priority of process %d: %s", pid, error)
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError:
        pass
