"""Audited administration: who may change budgets, rules, prices, rate limits, routes and settings, and
the audit row every change (and every refused attempt) leaves in the same hash chain as the calls.

An administrative audit row has ``decision`` ``"admin"`` (status ``"applied"``) or ``"admin_refused"``
(status ``"refused"``); ``user_id`` is who, ``recorded_at`` when, ``audit_reason`` the reason given,
``rule`` ``"<kind>:<key>"`` and ``extra`` ``{"kind", "key", "action", "old", "new", "actor_source", "via"}``.

Who is the identity the caller authenticated as where there is one (an ``actor`` passed by a service
that authenticated its caller, e.g. a proxy's auth function; else the MLflow user the process logs in
as), else the operating-system user running the command; ``actor_source`` says which.
"""

from __future__ import annotations

import getpass
import logging
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tidyllm.errors import AdministrationError
from tidyllm.mart.store import utcnow

if TYPE_CHECKING:
    from tidyllm.governance.audit import AuditTrail

__all__ = ["Administration", "ADMIN", "ADMIN_REFUSED"]

log = logging.getLogger("tidyllm.governance")

#: ``audit_log.decision`` of an applied administrative change, and of a refused one
ADMIN = "admin"
ADMIN_REFUSED = "admin_refused"


def os_user() -> str:
    """The operating-system user running this process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers running as an arbitrary uid)
        return f"uid:{os.getuid()}"


def _groups_of(user: str) -> set[str]:
    try:
        import grp
        import pwd
    except ImportError:  # pragma: no cover - Windows has no POSIX groups
        return set()
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    try:
        names.add(grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name)
    except KeyError:
        pass
    return names


class Administration:
    """Checks and audits administrative changes.

    Parameters
    ----------
    audit:
        The audit trail the rows go to.
    admins:
        Users (or ``group:NAME`` for members of an OS group) allowed to administer; empty = anyone.
    require_reason:
        Refuse a change made from the command line (``via="cli"``) without a reason
        (``governance.require_audit``); programs calling the API are audited with the reason they give.
    authenticated:
        The identity this process authenticated as (the MLflow user), used when no ``actor`` is given.
    """

    def __init__(self, audit: "AuditTrail", *, admins: Sequence[str] = (), require_reason: bool = False,
                 authenticated: str | None = None) -> None:
        self.audit = audit
        self.admins = tuple(admins)
        self.require_reason = require_reason
        self.authenticated = authenticated

    def identity(self, actor: str | None = None) -> tuple[str, str]:
        """``(who, how we know)``: the given actor, the authenticated MLflow user, or the OS user."""
        if actor:
            return str(actor), "caller"
        if self.authenticated:
            return self.authenticated, "mlflow"
        return os_user(), "os"

    def is_admin(self, who: str) -> bool:
        """Whether ``who`` may administer (always, when no admins are configured)."""
        if not self.admins:
            return True
        if who in self.admins:
            return True
        groups = [a.split(":", 1)[1] for a in self.admins if a.startswith("group:")]
        return bool(groups) and bool(_groups_of(who) & set(groups))

    def authorize(self, kind: str, key: str, *, action: str, reason: str | None, actor: str | None,
                  new: Any = None, via: str = "api") -> tuple[str, str]:
        """Allow a change or refuse it: a refusal is audited (in its own transaction) and raised as
        :class:`~tidyllm.errors.AdministrationError`. Returns ``(who, actor_source)``."""
        who, source = self.identity(actor)
        problem = None
        if not self.is_admin(who):
            problem = (f"{who!r} may not change {kind} {key!r}: only governance.admins "
                       f"({', '.join(self.admins)}) may administer budgets, rules, prices and rate limits")
        elif self.require_reason and via == "cli" and not (reason and reason.strip()):
            problem = (f"changing {kind} {key!r} needs a reason because governance.require_audit is on: "
                       "pass --reason '...' (or reason='...')")
        if problem is None:
            return who, source
        with self.audit._store.begin(write=True) as conn:
            self.audit.append(conn, self.row(kind, key, action=action, old=None, new=new, reason=reason, who=who,
                                             source=source, via=via, refused=problem))
        log.warning("administration refused: %s", problem)
        raise AdministrationError(problem)

    def record(self, conn: Any, kind: str, key: str, *, action: str, old: Any, new: Any, reason: str | None,
               who: str, source: str, via: str = "api", department: str | None = None) -> dict[str, Any]:
        """Append the audit row of an applied change in the caller's write transaction ``conn``."""
        return self.audit.append(conn, self.row(kind, key, action=action, old=old, new=new, reason=reason, who=who,
                                                source=source, via=via, department=department))

    @staticmethod
    def row(kind: str, key: str, *, action: str, old: Any, new: Any, reason: str | None, who: str, source: str,
            via: str, department: str | None = None, refused: str | None = None) -> dict[str, Any]:
        """The audit row of an administrative change (or of its refusal, when ``refused`` says why)."""
        from tidyllm.redact import safe_value

        return {"recorded_at": utcnow(), "user_id": who, "department": department, "audit_reason": reason,
                "route": key if kind == "route" else None,
                "decision": ADMIN_REFUSED if refused else ADMIN, "rule": f"{kind}:{key}"[:300],
                "status": "refused" if refused else "applied", "error": refused,
                "extra": {"kind": kind, "key": key, "action": action, "old": safe_value(old), "new": safe_value(new),
                          "actor_source": source, "via": via}}


def describe_change(kind: str, key: str, old: Any, new: Any) -> str:
    """One line for people: ``budget department/risk/month: limit_usd 4.0 → 60.0``."""
    if old is None:
        return f"{kind} {key}: added {new}"
    if new is None:
        return f"{kind} {key}: removed (was {old})"
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        parts = [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return f"{kind} {key}: " + ", ".join(parts)
    return f"{kind} {key}: {old!r} → {new!r}"
