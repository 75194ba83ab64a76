"""The settlement journal: a per-process, append-only file that keeps what the database could not take.

Two kinds of entry, one JSON object a line:

- ``admit`` / ``done`` — an admission-credit call is written ahead when it is admitted (it has no
  ``pending`` row in the database while it is at the provider) and marked done once its row is
  written. Should the process die in between, whoever reclaims its block (on this host) finds the
  call here and charges it at its worst case instead of releasing its money.
- ``keep`` / ``applied`` — a settlement write that failed (database locked past its timeout, disk
  full, server restarting) is kept here, retried with backoff by a background thread, and — should
  this process end first — replayed by the next tidyllm process on this host that opens the mart.
  A kept write is idempotent: replaying it twice writes once.

The file lives in ``governance.spool_dir`` (one folder per mart), is created owner-only (0600), and
holds what an audit row holds (content only as the audit capture policy allows). Writes are flushed
to the operating system at once (they survive the process being killed) and fsynced for ``keep``
entries (they survive a crash of the host too).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__all__ = ["Spool", "Journal", "owner_id", "owner_alive", "spool_dir_for"]

log = logging.getLogger("tidyllm.governance")

_TRUNCATE_AT = 1 << 20


def _process_start(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot), so a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def owner_id(pid: int | None = None) -> str:
    """This process's lease-owner id: ``host:pid:start``."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process ``owner`` names still runs: True/False on this host, None for another host."""
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start == "0" or _process_start(pid) == start


def spool_dir_for(mart_url: str, configured: str | None) -> Path:
    """The journal folder of a mart: the setting, else ``spool/`` beside a SQLite file, else under the home."""
    import hashlib

    if configured:
        return Path(configured).expanduser()
    if mart_url.startswith("sqlite:///") and ":memory:" not in mart_url:
        path = Path(mart_url[len("sqlite:///"):].split("?", 1)[0])
        return path.parent / f"{path.name}.spool"
    home = os.environ.get("TIDYLLM_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tidyllm"
    return base / "spool" / hashlib.sha256(mart_url.encode()).hexdigest()[:16]


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$dt"}:
            return dt.datetime.fromisoformat(value["$dt"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class Journal:
    """What one process's journal file says: credit calls in flight, kept writes not yet applied."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: call id -> (block id, worst, call row) of credit calls admitted and not written
        self.in_flight: dict[str, tuple[str, float, dict[str, Any]]] = {}
        #: kept settlement writes not yet applied, in order
        self.kept: list[dict[str, Any]] = []
        applied: set[str] = set()
        kept: list[tuple[str, dict[str, Any]]] = []
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            text = ""
        for line in text.splitlines():
            try:
                entry = _decode(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash mid-write
            kind = entry.get("t")
            if kind == "admit":
                self.in_flight[entry["call"]] = (entry["block"], float(entry["worst"]), entry["row"])
            elif kind == "done":
                self.in_flight.pop(entry["call"], None)
            elif kind == "keep":
                kept.append((entry["key"], entry["op"]))
            elif kind == "applied":
                applied.add(entry["key"])
        self.kept = [op for key, op in kept if key not in applied]


class Spool:
    """This process's journal (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._fh: Any = None
        self._pid = -1
        self._outstanding: set[str] = set()
        self._pending: dict[str, dict[str, Any]] = {}
        self._retry: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.directory / _file_name(owner_id())

    def _file(self) -> Any:
        if self._pid != os.getpid():  # first use, or a forked child: its own journal
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._fh = os.fdopen(fd, "a", encoding="utf-8")
            self._pid = os.getpid()
            self._outstanding = set()
            self._pending = {}
        return self._fh

    def _write(self, entry: Mapping[str, Any], *, sync: bool = False) -> None:
        line = json.dumps(_encode(entry), separators=(",", ":"), default=str) + "\n"
        with self._lock:
            fh = self._file()
            fh.write(line)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())

    # --- credit calls written ahead ------------------------------------------------------------------
    def admitted(self, call_id: str, block_id: str, worst: float, row: Mapping[str, Any]) -> None:
        """A credit call is at the provider: should this process die now, it is charged at ``worst``."""
        self._write({"t": "admit", "call": call_id, "block": block_id, "worst": worst, "row": row})
        self._outstanding.add(call_id)

    def finished(self, call_id: str) -> None:
        """A credit call's row is written (or kept): it is no longer only here."""
        self._write({"t": "done", "call": call_id})
        self._outstanding.discard(call_id)
        self._maybe_truncate()

    # --- writes the database refused -----------------------------------------------------------------
    def keep(self, op: Mapping[str, Any]) -> None:
        """Keep a settlement write the database refused (fsynced: it survives a host crash too)."""
        key = _key(op)
        self._write({"t": "keep", "key": key, "op": op}, sync=True)
        with self._lock:
            self._pending[key] = _decode(_encode(op))

    def retry_soon(self, apply: Callable[[Mapping[str, Any]], bool]) -> None:
        """Retry the kept writes on a background thread, with backoff, until the database takes them."""
        with self._lock:
            if self._retry is not None:
                return
            # a daemon: a process whose database stays down must still exit (what is left stays in the
            # journal for the next process on this host)
            self._retry = threading.Thread(target=self._run_retry, args=(apply,), name="tidyllm-spool", daemon=True)
            self._retry.start()

    def _run_retry(self, apply: Callable[[Mapping[str, Any]], bool]) -> None:
        delay = 0.25
        deadline = time.monotonic() + 600.0
        while True:
            time.sleep(delay)
            self.drain(apply)
            with self._lock:
                if not self._pending or time.monotonic() > deadline:
                    self._retry = None
                    return
            delay = min(delay * 2, 15.0)

    def drain(self, apply: Callable[[Mapping[str, Any]], bool]) -> int:
        """Apply this process's kept writes now; returns how many the database took."""
        with self._lock:
            todo = list(self._pending.items())
        applied = 0
        for key, op in todo:
            try:
                apply({**op, "replayed": True})
            except Exception as exc:  # noqa: BLE001 - still refused: kept for the next try
                log.debug("kept settlement %s still refused: %s", key, exc)
                continue
            self._write({"t": "applied", "key": key}, sync=True)
            with self._lock:
                self._pending.pop(key, None)
            applied += 1
        self._maybe_truncate()
        return applied

    @property
    def pending(self) -> int:
        """Kept writes not yet applied."""
        return len(self._pending)

    def _maybe_truncate(self) -> None:
        with self._lock:
            fh = self._fh
            if fh is None or self._outstanding or self._pending or self._pid != os.getpid():
                return
            try:
                if os.fstat(fh.fileno()).st_size > _TRUNCATE_AT:
                    os.ftruncate(fh.fileno(), 0)
            except OSError:
                pass

    # --- other processes' journals ---------------------------------------------------------------------
    def orphans(self) -> Iterator[tuple[str, Journal, Callable[[], None]]]:
        """``(owner, journal, remove)`` for each journal on this host whose process is gone, locked so
        that one process at a time recovers it; ``remove()`` deletes it once recovered."""
        if not self.directory.is_dir():
            return
        mine = self.path.name
        for path in sorted(self.directory.glob("*.jsonl")):
            if path.name == mine:
                continue
            owner = path.stem.replace("~", ":")
            if owner_alive(owner) is not False:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            try:
                yield owner, Journal(path), lambda p=path: p.unlink(missing_ok=True)
            finally:
                os.close(fd)

    def in_flight_of(self, owner: str) -> dict[str, tuple[str, float, dict[str, Any]]]:
        """Credit calls the (dead) process ``owner`` had at the provider, from its journal on this host."""
        path = self.directory / _file_name(owner)
        return Journal(path).in_flight if path.exists() else {}


def _file_name(owner: str) -> str:
    return owner.replace(":", "~") + ".jsonl"


def _key(op: Mapping[str, Any]) -> str:
    admission = op.get("admission") or {}
    return f"{op.get('kind')}:{admission.get('call_id')}"
