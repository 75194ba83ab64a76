"""Start, watch and stop LiteLLM's proxy server, with the same no-orphan guarantees as the MLflow gateway.

The proxy runs LiteLLM's own CLI (``python -m litellm.proxy.proxy_cli --config ...``) under tidyllm's
supervisor (``python -m tidyllm.gateway.processes``), which leads its own process group and takes it
down when its parent dies; :meth:`ProxyProcess.stop` (also registered with :mod:`atexit`) sends SIGTERM
to the group, then SIGKILL after a grace period. The config is written to a private temporary
directory (mode 0700) that goes with the process.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from tidyllm.errors import GatewayError
from tidyllm.gateway.processes import _check_port, _group_members, _signal_group, free_port

__all__ = ["ProxyProcess", "start_proxy"]

_log = logging.getLogger("tidyllm.proxy")
_PORT_IN_USE = ("address already in use", "error while attempting to bind")


class ProxyProcess:
    """A running LiteLLM proxy started by :func:`start_proxy`; a context manager that stops it."""

    def __init__(self, popen: subprocess.Popen[bytes], *, host: str, port: int, run_dir: Path) -> None:
        self._popen = popen
        self.host, self.port = host, port
        #: the private directory with the generated config and the proxy's log
        self.run_dir = run_dir
        self.log_path = run_dir / "litellm-proxy.log"
        self._stopped = False
        atexit.register(self.stop)

    @property
    def uri(self) -> str:
        """``http://host:port`` of the proxy (OpenAI SDK: ``base_url=uri + "/v1"``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """Process id of the supervisor, which is also the id of the proxy's process group."""
        return self._popen.pid

    def __repr__(self) -> str:
        return f"<ProxyProcess {self.uri} pid={self.pid} {'stopped' if self._stopped else 'running'}>"

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def is_running(self) -> bool:
        """Whether the proxy answers its liveness probe."""
        return not self._stopped and self._popen.poll() is None and _alive(self.uri)

    def wait(self, poll: float = 2.0, echo: Callable[[str], Any] | None = None) -> None:
        """Block until the proxy stops answering (it died or was stopped elsewhere); ``echo`` gets each
        new line of the proxy's log meanwhile."""
        misses = 0
        offset = 0
        while misses < 3:
            deadline = time.monotonic() + poll
            while time.monotonic() < deadline:
                if echo is not None:
                    offset = self._echo(offset, echo)
                time.sleep(0.2)
            misses = 0 if self.is_running() else misses + 1
        if echo is not None:
            self._echo(offset, echo)

    def _echo(self, offset: int, echo: Callable[[str], Any]) -> int:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return offset
        end = data.rfind(b"\n") + 1  # whole lines only
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            if '"GET /health/liveliness' not in line:  # our own probes
                echo(line)
        return offset + end

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the proxy wrote."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """Everything the proxy wrote so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds; idempotent."""
        if self._stopped:
            return
        pgid = self._popen.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _group_members(pgid) and time.monotonic() < deadline:
            self._popen.poll()
            time.sleep(0.05)
        if _group_members(pgid):
            _log.warning("LiteLLM proxy pid %s did not stop within %.0f s; killing it", pgid, grace)
            _signal_group(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while _group_members(pgid) and time.monotonic() < kill_deadline:
                self._popen.poll()
                time.sleep(0.05)
        self._popen.wait()
        self._stopped = True
        atexit.unregister(self.stop)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _wait_alive(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log_tail(40)
            if self._popen.poll() is not None or any(m in tail.lower() for m in _PORT_IN_USE):
                code = self._popen.poll()
                self.stop()
                raise GatewayError(f"the LiteLLM proxy did not start ({'exit code %s' % code if code is not None else 'its server died'}). "
                                   f"Last lines of its log:\n{tail}")
            if _alive(self.uri):
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise GatewayError(f"the LiteLLM proxy did not answer {self.uri}/health/liveliness within {timeout:.0f} s; "
                           f"raise --timeout on a slow machine. Last lines of its log:\n{tail}")


def _alive(uri: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{uri}/health/liveliness", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_proxy(config: Mapping[str, Any], *, host: str = "127.0.0.1", port: int | None = None,
                workers: int = 1, env: Mapping[str, str] | None = None, timeout: float = 120.0,
                cwd: str | os.PathLike[str] | None = None) -> ProxyProcess:
    """Start LiteLLM's proxy on ``config`` (see :func:`tidyllm.proxy.config.proxy_config`) and wait until it
    answers its liveness probe. ``env`` adds variables to its environment (``TIDYLLM_*`` settings,
    ``TIDYLLM_CONFIG``); ``port=None`` picks a free one. The proxy runs in ``cwd`` (default: this process's
    working directory, so relative paths in the settings mean the same)."""
    from tidyllm.proxy.config import write_config

    if workers < 1:
        raise GatewayError(f"workers must be at least 1, got {workers}")
    if port is None:
        port = free_port(host)
    else:
        _check_port(host, port)
    run_dir = Path(tempfile.mkdtemp(prefix="tidyllm-proxy-"))
    try:
        config_path = write_config(dict(config), run_dir / "litellm-config.yaml")
        import tidyllm

        package_root = str(Path(tidyllm.__file__).resolve().parents[1])
        child_env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", **os.environ, **(env or {})}
        # the proxy imports tidyllm.proxy.runtime by name, wherever the caller's tidyllm comes from
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, child_env.get("PYTHONPATH")]))
        # LiteLLM's proxy would otherwise phone home (telemetry) and look for a Prisma database
        child_env.setdefault("LITELLM_TELEMETRY", "False")
        child_env.pop("DATABASE_URL", None)
        # LiteLLM will not start without a master key; with tidyllm's custom_auth it opens nothing
        child_env.setdefault("LITELLM_MASTER_KEY", "sk-" + secrets.token_hex(32))
        argv = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config_path), "--host", host,
                "--port", str(port), "--num_workers", str(workers)]
        supervisor = [sys.executable, "-m", "tidyllm.gateway.processes", "--parent", str(os.getpid()), "--", *argv]
        with open(run_dir / "litellm-proxy.log", "ab") as log:
            popen = subprocess.Popen(supervisor, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=child_env, cwd=cwd or os.getcwd(), start_new_session=True)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    proxy = ProxyProcess(popen, host=host, port=port, run_dir=run_dir)
    try:
        proxy._wait_alive(timeout)
    except BaseException:
        proxy.stop()
        raise
    return proxy
