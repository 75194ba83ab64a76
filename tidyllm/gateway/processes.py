"""Start, watch and stop real MLflow gateway processes, in either flavour.

* ``legacy``: ``mlflow gateway start`` on a YAML that tidyllm writes from the routes file into a
  private temporary directory (credentials stay ``$VAR`` references; MLflow resolves them from
  the process environment). Fast to start (~4 s), no database, no fallbacks.
* ``server``: ``mlflow server`` with a SQLite database in ``data_dir``; its AI Gateway is then
  provisioned over REST by :func:`tidyllm.gateway.sync.sync_gateway`. Optionally with MLflow's
  ``basic-auth`` app.

No orphans: each gateway runs under a small supervisor (``python -m tidyllm.gateway.processes``)
that leads its own process group (``start_new_session``). :meth:`GatewayProcess.stop` sends
SIGTERM to the whole group, then SIGKILL after a grace period; it is registered with
:mod:`atexit`, so a normal exit or Ctrl-C (KeyboardInterrupt) cleans up. A parent killed by
SIGTERM or SIGKILL runs no Python cleanup at all, so the supervisor polls its parent and takes
the group down itself when the parent is gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from tidyllm.errors import GatewayError
from tidyllm.gateway.client import Auth, api_base

if TYPE_CHECKING:
    from tidyllm.gateway.config import GatewayConfig

__all__ = ["GatewayProcess", "free_port", "start_gateway"]

_log = logging.getLogger(__name__)

#: environment the tracking server gets unless the caller's environment says otherwise
_SERVER_DEFAULTS = {
    # the huey job runner adds 8 processes and ~20 s of shutdown; the gateway does not need it
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # let endpoints reach providers on http:// and private addresses (a local vLLM, Ollama, the
    # simulator); set these to "https" / "false" in the environment to harden a shared server
    "MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS": "true",
    # offline/enterprise networks: no price-map fetch from the internet at start
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}
#: both flavours: no usage telemetry sent to MLflow's servers from a corporate gateway
_COMMON_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true"}
#: lower-case markers in MLflow's log: gunicorn/uvicorn could not bind, or gunicorn gave up
_PORT_IN_USE = ("address already in use", "connection in use")
_GUNICORN_DIED = ("shutting down: master", "worker failed to boot")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # the same option uvicorn/gunicorn set: a port in TIME_WAIT is free, one with a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise GatewayError(f"port {port} on {host} is already in use ({exc.strerror}); choose another with "
                               f"--port, or leave the port out to get a free one") from exc


class GatewayProcess:
    """A running MLflow gateway started by :func:`start_gateway`; a context manager that stops it."""

    def __init__(self, popen: subprocess.Popen[bytes], *, mode: str, host: str, port: int, log_path: Path,
                 run_dir: Path, remove_run_dir: bool, log_offset: int = 0) -> None:
        self._popen = popen
        self.mode = mode
        self.host, self.port = host, port
        #: the supervisor's log: stdout and stderr of MLflow
        self.log_path = log_path
        #: the temporary directory (legacy) or the data directory (server)
        self.data_dir = run_dir
        self._remove_run_dir = remove_run_dir
        # a kept data_dir keeps its log across runs: read only what this run wrote
        self._log_offset = log_offset
        self._stopped = False
        atexit.register(self.stop)

    @property
    def uri(self) -> str:
        """``http://host:port`` of the gateway."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """What LiteLLM needs as ``api_base`` with ``model="openai/<endpoint>"``."""
        return api_base(self.uri, self.mode)

    @property
    def pid(self) -> int:
        """Process id of the supervisor, which is also the id of the gateway's process group."""
        return self._popen.pid

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<GatewayProcess {self.mode} {self.uri} pid={self.pid} {state}>"

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        """Whether the gateway answers ``/health`` (the supervisor alone alive is not enough)."""
        return not self._stopped and self._popen.poll() is None and _healthy(self.uri)

    def wait(self, poll: float = 2.0) -> None:
        """Block until the gateway stops answering (it died or was stopped elsewhere)."""
        misses = 0
        while misses < 3:  # one slow answer during a worker restart is not death
            time.sleep(poll)
            misses = 0 if self.is_running() else misses + 1

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines MLflow wrote in this run."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds; idempotent."""
        if self._stopped:
            return
        pgid = self._popen.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_members(pgid) and time.monotonic() < deadline:
            self._popen.poll()  # reap the supervisor so it does not linger as a zombie
            time.sleep(0.05)
        if _group_members(pgid):
            _log.warning("MLflow gateway pid %s did not stop within %.0f s; killing it", pgid, grace)
            _signal_group(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while _group_members(pgid) and time.monotonic() < kill_deadline:
                self._popen.poll()
                time.sleep(0.05)
        self._popen.wait()
        self._stopped = True
        atexit.unregister(self.stop)
        if self._remove_run_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log_tail(40)
            seen = tail.lower()
            if self._popen.poll() is not None or any(m in seen for m in _GUNICORN_DIED + _PORT_IN_USE):
                in_use = any(m in seen for m in _PORT_IN_USE)
                code = self._popen.poll()
                self.stop()
                reason = (f"port {self.port} on {self.host} is already in use; choose another with --port"
                          if in_use else f"it exited (code {code})" if code is not None else "its server died")
                raise GatewayError(f"the MLflow {self.mode} gateway did not start: {reason}. "
                                   f"Last lines of {self._log_name()}:\n{tail}")
            if _healthy(self.uri):
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise GatewayError(f"the MLflow {self.mode} gateway did not answer {self.uri}/health within {timeout:.0f} s; "
                           f"raise the timeout on a slow machine. Last lines of {self._log_name()}:\n{tail}")

    def _log_name(self) -> str:
        # a temporary run directory is gone once stopped: do not point at a file that no longer exists
        return "MLflow's log" if self._remove_run_dir else str(self.log_path)


def _healthy(uri: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{uri}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_gateway(config: Any = None, mode: str = "legacy", host: str = "127.0.0.1", port: int | None = None,
                  workers: int = 1, env: Mapping[str, str] | None = None, timeout: float = 60.0,
                  data_dir: str | os.PathLike[str] | None = None, auth: Auth | None = None) -> GatewayProcess:
    """Start an MLflow gateway serving ``config``'s routes and wait until it answers ``/health``.

    ``config`` is a routes file path, a mapping or a :class:`~tidyllm.gateway.config.GatewayConfig`
    (optional for ``mode="server"``: an empty gateway to sync later). ``port=None`` picks a free
    one. ``env`` adds variables to the gateway's environment and is where ``$VAR`` references are
    looked up (over ``os.environ``). ``mode="server"`` keeps its database, KEK passphrase and log
    in ``data_dir`` (a temporary directory, removed at stop, when ``None``); ``auth=(user,
    password)`` turns on MLflow's basic-auth app with that admin and syncs with it.

    Raises :class:`~tidyllm.errors.GatewayConfigError` for a bad file or an unset ``$VAR`` and
    :class:`~tidyllm.errors.GatewayError` when the port is taken, MLflow dies (with the tail of
    its log) or ``/health`` does not answer within ``timeout`` seconds.
    """
    from tidyllm.gateway.config import load_gateway_config

    if mode not in ("legacy", "server"):
        raise GatewayError(f"unknown gateway mode {mode!r}; use 'legacy' or 'server'")
    if workers < 1:
        raise GatewayError(f"workers must be at least 1, got {workers}")
    environ = {**os.environ, **(env or {})}
    cfg = load_gateway_config(config) if config is not None else None
    # everything that can be wrong with the file is found before a process starts
    if cfg is not None:
        cfg.check_secrets(environ)
    if port is None:
        port = free_port(host)
    else:
        _check_port(host, port)
    if mode == "legacy":
        if cfg is None:
            raise GatewayError("the legacy gateway needs a routes file (--config)")
        gateway = _start_legacy(cfg, environ, host, port, workers)
    else:
        if cfg is not None:
            from tidyllm.gateway.sync import server_spec

            for route in cfg.routes:
                server_spec(cfg, route, environ)
        gateway = _start_server(environ, host, port, workers, data_dir, auth)
    try:
        gateway._wait_healthy(timeout)
        if cfg is not None and mode == "server":
            from tidyllm.gateway.sync import sync_gateway

            sync_gateway(gateway.uri, cfg, auth=auth, environ=environ)
    except BaseException:  # KeyboardInterrupt while waiting included: never leave it running
        gateway.stop()
        raise
    return gateway


def _start_legacy(cfg: GatewayConfig, environ: dict[str, str], host: str, port: int, workers: int) -> GatewayProcess:
    if any(r.fallbacks for r in cfg.routes):
        _log.warning("%s: the legacy gateway has no fallbacks; 'fallbacks:' apply only with --mode server",
                     cfg.source)
    run_dir = Path(tempfile.mkdtemp(prefix="tidyllm-gateway-"))
    try:
        yaml_path = cfg.to_mlflow_yaml(run_dir / "gateway.yaml", environ)
        child_env = {**_COMMON_DEFAULTS, **environ, **cfg.legacy_environment(environ)}
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    argv = [sys.executable, "-m", "mlflow", "gateway", "start", "--config-path", str(yaml_path),
            "--host", host, "--port", str(port), "--workers", str(workers)]
    return _spawn(argv, child_env, "legacy", host, port, run_dir, remove_run_dir=True)


def _start_server(environ: dict[str, str], host: str, port: int, workers: int,
                  data_dir: str | os.PathLike[str] | None, auth: Auth | None) -> GatewayProcess:
    run_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="tidyllm-mlflow-"))
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    child_env = {**_COMMON_DEFAULTS, **_SERVER_DEFAULTS, **environ, "MLFLOW_GATEWAY_URI": f"http://{host}:{port}"}
    child_env.setdefault("MLFLOW_CRYPTO_KEK_PASSPHRASE", _local_secret(run_dir / "kek_passphrase"))
    argv = [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{run_dir / 'mlflow.db'}",
            "--default-artifact-root", str(run_dir / "artifacts"), "--no-serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers),
            # the gateway caches endpoint configs where the REST handlers cannot invalidate them:
            # a sync takes effect after this many seconds (MLflow's minimum; its default is 60)
            "--secrets-cache-ttl", child_env.get("MLFLOW_SERVER_SECRETS_CACHE_TTL", "10")]
    if auth is not None:
        argv += ["--app-name", "basic-auth"]
        child_env.update(_basic_auth_env(run_dir, auth, child_env))
    return _spawn(argv, child_env, "server", host, port, run_dir, remove_run_dir=data_dir is None)


def _spawn(argv: list[str], env: dict[str, str], mode: str, host: str, port: int, run_dir: Path, *,
           remove_run_dir: bool) -> GatewayProcess:
    import tidyllm

    log_path = run_dir / f"mlflow-{mode}.log"
    # the supervisor imports this module, wherever the caller's tidyllm comes from
    package_root = str(Path(tidyllm.__file__).resolve().parents[1])
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))}
    supervisor = [sys.executable, "-m", "tidyllm.gateway.processes", "--parent", str(os.getpid()), "--", *argv]
    with open(log_path, "ab") as log:
        offset = log.tell()
        popen = subprocess.Popen(supervisor, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, cwd=run_dir, start_new_session=True)
    return GatewayProcess(popen, mode=mode, host=host, port=port, log_path=log_path, run_dir=run_dir,
                          remove_run_dir=remove_run_dir, log_offset=offset)


def _local_secret(path: Path) -> str:
    """A random secret kept in ``path`` (mode 0600), created on first use: local servers only.

    Losing the KEK passphrase file makes the secrets in that database undecryptable; for a
    shared server set ``MLFLOW_CRYPTO_KEK_PASSPHRASE`` from your secret store instead.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        value = secrets.token_urlsafe(32)
        fh.write(value)
    return value


def _basic_auth_env(run_dir: Path, auth: Auth, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment for ``--app-name basic-auth``: an ini without the password, the admin in env."""
    ini = run_dir / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{run_dir / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # each request otherwise pays a PBKDF2 password check (~0.4 s on 2 cores)
        "auth_cache_ttl_seconds = 60\n",
        encoding="utf-8")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        # read by MLflow only when it creates the admin in a new auth database
        "MLFLOW_AUTH_ADMIN_USERNAME": auth[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": auth[1],
        # Flask-WTF's CSRF key; MLflow refuses to start the auth app without one
        "MLFLOW_FLASK_SERVER_SECRET_KEY": environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
        or _local_secret(run_dir / "flask_secret_key"),
    }


# --- process groups ---------------------------------------------------------------------------


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of group ``pgid``; from /proc on Linux, else a liveness probe."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _supervise(parent: int, argv: list[str], grace: float = 10.0) -> int:
    """Run ``argv`` in this process group; take the group down when ``parent`` dies. Returns its exit code."""
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True  # the group got the signal too; wait for the child to finish

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(argv)
    orphaned_at = None
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if orphaned_at is None and os.getppid() != parent:
            orphaned_at = time.monotonic()
            stopping = True
            _signal_group(os.getpgrp(), signal.SIGTERM)
        if orphaned_at is not None and time.monotonic() - orphaned_at > grace:
            child.kill()
    if orphaned_at is not None or stopping:
        # nobody else will clean up after gunicorn/uvicorn workers that outlive their parent
        deadline = time.monotonic() + grace
        while (others := [p for p in _group_members(os.getpgrp()) if p != os.getpid()]):
            if time.monotonic() > deadline:
                for pid in others:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.1)
    return code


def _main(args: list[str]) -> int:
    if len(args) < 4 or args[0] != "--parent" or args[2] != "--":
        print("usage: python -m tidyllm.gateway.processes --parent PID -- COMMAND...", file=sys.stderr)
        return 2
    return _supervise(int(args[1]), args[3:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
