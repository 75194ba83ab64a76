"""Signed checkpoints of the audit chain, kept outside the database.

The hash chain (:mod:`tidyllm.governance.audit`) detects an edit by anyone who does not recompute the
digests after it; a database writer can recompute them (the hash function is public), or empty the
tables. So, every ``audit.checkpoint_rows`` rows or ``audit.checkpoint_minutes`` minutes (and on
``tidyllm audit checkpoint``), tidyllm signs the chain head — ``(seq, digest, rows, calls, time)`` —
with an Ed25519 key kept outside the database (``audit.key_file``, created owner-only on first use) and
appends the signed checkpoint to a local append-only file (``audit.checkpoint_file``) and, when an
MLflow tracking URI is configured, logs it as an MLflow artifact. This is the anchor Certificate
Transparency's signed tree heads and ledger databases' digests provide.

:func:`verify_trail` checks the chain, then every checkpoint against the database: the signed row must
still exist with the signed digest, the rows up to it must still number what was signed, the head must
not be behind it, and the calls table must still hold as many calls. The first checkpoint contradicted
is reported. What each attacker can and cannot hide is in docs/operations.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from tidyllm.errors import ConfigurationError, StorageError
from tidyllm.mart.schema import audit_head, audit_log, llm_calls
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.mart import TidyMart

__all__ = ["Checkpoints", "TrailReport", "verify_trail", "default_key_file"]

log = logging.getLogger("tidyllm.governance")


def default_key_file() -> Path:
    """``audit-ed25519.key`` beside the default mart (``$TIDYLLM_HOME``, else the XDG data folder)."""
    from tidyllm.settings import default_database_url

    return Path(default_database_url().removeprefix("sqlite:///")).parent / "audit-ed25519.key"


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class TrailReport:
    """Outcome of :func:`verify_trail`: the chain, the checkpoints and the call rows together."""

    ok: bool
    rows: int
    checkpoints: int
    message: str
    #: the first checkpoint the database contradicts (its line in the checkpoint file), if any
    first_contradicted: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.message


class Checkpoints:
    """Signs checkpoints of a mart's audit chain and reads them back.

    Parameters
    ----------
    mart:
        The mart whose chain is checkpointed.
    key_file:
        The Ed25519 private key (PEM, PKCS#8); created with mode 0600 when missing.
    checkpoint_file:
        The append-only JSON Lines file of signed checkpoints (default: beside the key).
    every_rows, every_minutes:
        When the background worker signs: after this many new rows, or this long after the last
        checkpoint when rows were added (0 turns either off).
    mlflow_uri:
        An MLflow tracking URI each checkpoint is also logged to, as an artifact of a run in the
        experiment ``tidyllm-audit-checkpoints`` (None: none).
    """

    def __init__(self, mart: "TidyMart", *, key_file: str | os.PathLike[str] | None = None,
                 checkpoint_file: str | os.PathLike[str] | None = None, every_rows: int = 1000,
                 every_minutes: float = 60.0, mlflow_uri: str | None = None) -> None:
        self._mart = mart
        self._store = mart.store
        self.key_file = Path(key_file) if key_file else default_key_file()
        self.checkpoint_file = Path(checkpoint_file) if checkpoint_file else \
            self.key_file.with_name("audit-checkpoints.jsonl")
        self.every_rows = int(every_rows)
        self.every_minutes = float(every_minutes)
        self.mlflow_uri = mlflow_uri
        self._key: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[int, float] | None = None  # (rows, monotonic time) of this process's last checkpoint

    @property
    def mart_id(self) -> str:
        """Which mart a checkpoint belongs to: its URL with any password hidden."""
        return self._store.safe_url

    # --- the key ------------------------------------------------------------------------------

    def private_key(self) -> Any:
        """The signing key, created owner-only (0600) on first use."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if self._key is not None:
            return self._key
        with self._lock:
            if not self.key_file.exists():
                self.key_file.parent.mkdir(parents=True, exist_ok=True)
                key = Ed25519PrivateKey.generate()
                pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
                try:
                    fd: int | None = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    fd = None  # another process made it a moment ago: read theirs
                if fd is not None:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(pem)
                    log.warning("created the audit checkpoint key %s (owner-only); keep it off the database host's "
                                "backups and out of the database administrators' reach", self.key_file)
            try:
                data = self.key_file.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"cannot read the audit key {self.key_file}: {exc.strerror}") from exc
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except ValueError as exc:
                raise ConfigurationError(f"{self.key_file} is not an Ed25519 private key in PEM form") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigurationError(f"{self.key_file} is not an Ed25519 key")
            self._key = key
            return key

    def key_id(self) -> str:
        """First 16 hex digits of SHA-256 over the raw public key."""
        from cryptography.hazmat.primitives import serialization

        raw = self.private_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16]

    # --- signing ------------------------------------------------------------------------------

    def head(self, *, calls: bool = True) -> dict[str, Any]:
        """The chain head now: seq, digest, rows, and (with ``calls``) the calls table's row count."""
        with self._store.begin() as conn:
            head = conn.execute(sa.select(audit_head)).mappings().first()
            calls = conn.execute(sa.select(sa.func.count()).select_from(llm_calls)).scalar_one() if calls else 0
        if head is None:
            return {"seq": 0, "digest": "0" * 64, "rows": 0, "calls": int(calls)}
        return {"seq": int(head["seq"]), "digest": head["digest"], "rows": int(head["rows"]), "calls": int(calls)}

    def checkpoint(self, *, reason: str = "manual") -> dict[str, Any]:
        """Sign the current head and append it to the checkpoint file (and MLflow); returns the line."""
        key = self.private_key()
        payload = {"v": 1, "mart": self.mart_id, **self.head(), "at": utcnow().isoformat(), "reason": reason}
        line = payload | {"key_id": self.key_id(), "signature": key.sign(_canonical(payload)).hex()}
        text = json.dumps(line, sort_keys=True) + "\n"
        self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: each checkpoint is one write at the end, whatever other processes append
        fd = os.open(self.checkpoint_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._last = (payload["rows"], time.monotonic())
        if self.mlflow_uri:
            self._log_to_mlflow(line)
        return line

    def _log_to_mlflow(self, line: dict[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.mlflow_uri)
            name = "tidyllm-audit-checkpoints"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=f"checkpoint-{line['rows']}",
                                    tags={"tidyllm.mart": line["mart"], "tidyllm.key_id": line["key_id"]})
            client.log_text(run.info.run_id, json.dumps(line, sort_keys=True), f"checkpoint-{line['seq']}.json")
            client.set_terminated(run.info.run_id)
        except Exception:  # noqa: BLE001 - the local file holds the checkpoint; MLflow is a second copy
            log.warning("could not log the audit checkpoint to MLflow at %s", self.mlflow_uri, exc_info=True)

    def read(self) -> list[dict[str, Any]]:
        """This mart's checkpoints from the file, oldest first (signatures not yet checked)."""
        try:
            text = self.checkpoint_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot read the audit checkpoints {self.checkpoint_file}: {exc.strerror}") from exc
        out = []
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                out.append({"line": n, "broken": True})
                continue
            if isinstance(line, dict) and line.get("mart") == self.mart_id:
                out.append(line | {"line": n})
        return out

    def signature_ok(self, line: dict[str, Any]) -> bool:
        """Whether ``line`` was signed by this key over exactly its fields."""
        from cryptography.exceptions import InvalidSignature

        if line.get("broken") or "signature" not in line:
            return False
        payload = {k: v for k, v in line.items() if k not in ("key_id", "signature", "line")}
        try:
            self.private_key().public_key().verify(bytes.fromhex(line["signature"]), _canonical(payload))
        except (InvalidSignature, ValueError):
            return False
        return True

    # --- the worker ---------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether enough rows or time passed since this process's (or the file's) last checkpoint."""
        rows = self.head(calls=False)["rows"]
        if self._last is None:
            previous = self.read()
            self._last = (int(previous[-1].get("rows", 0)) if previous else 0, time.monotonic())
        last_rows, last_time = self._last
        if rows <= last_rows:
            return False
        if self.every_rows and rows - last_rows >= self.every_rows:
            return True
        return bool(self.every_minutes) and time.monotonic() - last_time >= self.every_minutes * 60

    def start(self, poll_seconds: float = 5.0) -> "Checkpoints":
        """Sign checkpoints in the background when due (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, args=(poll_seconds,), name="tidyllm-checkpoints",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self, poll: float) -> None:
        while not self._stop.wait(poll):
            try:
                if self.due():
                    self.checkpoint(reason="scheduled")
            except Exception:  # noqa: BLE001 - keep trying; a missed checkpoint weakens, never breaks, the audit
                log.warning("could not sign an audit checkpoint", exc_info=True)

    def stop(self) -> None:
        """Stop the worker; sign a last checkpoint when rows were added since the previous one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
            try:
                if self._last is not None and self.head(calls=False)["rows"] > self._last[0]:
                    self.checkpoint(reason="shutdown")
            except Exception:  # noqa: BLE001 - a closed database at exit
                log.warning("could not sign the final audit checkpoint", exc_info=True)


def verify_trail(mart: "TidyMart", checkpoints: Checkpoints | None) -> TrailReport:
    """Check the hash chain, every checkpoint of this mart and the call rows (see the module docstring)."""
    from tidyllm.governance.audit import AuditTrail

    chain = AuditTrail(mart).verify()
    lines = checkpoints.read() if checkpoints is not None else []
    with mart.store.begin() as conn:
        calls = conn.execute(sa.select(sa.func.count()).select_from(llm_calls)).scalar_one()
        unaudited = conn.execute(sa.select(sa.func.count()).select_from(llm_calls).where(
            llm_calls.c.status != "pending",
            ~sa.exists().where(audit_log.c.call_id == llm_calls.c.id))).scalar_one()
        head = conn.execute(sa.select(audit_head)).mappings().first()
        head_rows = int(head["rows"]) if head else 0
        for cp in lines:
            problem = _contradiction(conn, cp, checkpoints, calls, head_rows) if checkpoints else None
            if problem:
                where = f"{checkpoints.checkpoint_file}:{cp.get('line')}" if checkpoints else ""
                signed = f" signed {cp.get('at')} over {cp.get('rows')} rows" if not cp.get("broken") else ""
                return TrailReport(False, chain.rows, len(lines),
                                   f"audit trail CONTRADICTS checkpoint {where}{signed}: {problem}", cp)
    if not chain.ok:
        return TrailReport(False, chain.rows, len(lines), str(chain))
    if unaudited:
        return TrailReport(False, chain.rows, len(lines),
                           f"audit trail INCOMPLETE: {unaudited} finished calls in llm_calls have no audit row "
                           f"(audit rows deleted, or the trail wiped; {calls} calls, {chain.rows} audit rows)")
    note = f"; {len(lines)} signed checkpoints agree" if lines else \
        "; no signed checkpoint yet (run `tidyllm audit checkpoint`): a wiped or re-chained trail is detectable " \
        "only from the first checkpoint on"
    return TrailReport(True, chain.rows, len(lines), f"{chain}{note}")


def _contradiction(conn: Any, cp: dict[str, Any], checkpoints: Checkpoints, calls: int, head_rows: int) -> str | None:
    if not checkpoints.signature_ok(cp):
        return "its signature does not verify with the audit key (the checkpoint file was edited, or the key changed)"
    seq, rows = int(cp["seq"]), int(cp["rows"])
    if rows == 0:
        return None
    if head_rows < rows:
        return (f"the chain head now counts {head_rows} rows, fewer than the {rows} signed: rows were deleted, "
                "the trail truncated or wiped")
    row = conn.execute(sa.select(audit_log.c.digest).where(audit_log.c.seq == seq)).first()
    if row is None:
        return f"the signed row seq={seq} is gone: rows were deleted, the trail truncated or wiped"
    if row[0] != cp["digest"]:
        return (f"row seq={seq} no longer has the signed digest {cp['digest'][:12]}…: rows up to it were edited and "
                "re-chained, reordered or replaced")
    upto = conn.execute(sa.select(sa.func.count()).select_from(audit_log).where(audit_log.c.seq <= seq)).scalar_one()
    if upto != rows:
        return f"{upto} rows lead up to seq={seq}, the checkpoint signed {rows}: rows were deleted or inserted"
    if calls < int(cp.get("calls", 0)):
        return f"llm_calls holds {calls} rows, fewer than the {cp['calls']} signed: call rows were deleted"
    return None

