"""Who is calling: identity sources, signed caller tokens, required context and name normalisation.

A governed call's user and department decide which budgets, authorisation rules and rate limits
apply to it, so they are resolved here once per call, by :class:`IdentityResolver`, from these
sources (strongest first), and the source is recorded on the call (``CallContext.identity_source``):

``authenticated``
    an identity the deployment authenticated and handed over — an entry point (a LiteLLM proxy's
    custom auth, a web service) runs the call inside ``with authenticated(Identity(...)):`` or
    passes ``resolve(..., authenticated=...)``. A caller's request can never produce one.
``token``
    a signed caller token (``tidyllm token issue --user ana --department risk --ttl 8h``), passed
    per call as ``metadata={"tidyllm_token": ...}`` or for a whole process as ``$TIDYLLM_TOKEN``.
    Tokens are HMAC-SHA256 signed with the platform's key, a file outside the database
    (:class:`tidyllm.governance.tokens.TokenKey`); an expired, tampered, malformed or other
    platform's token is refused.
``declared``
    ``metadata={"user_id": ..., "department": ...}`` and the configured ``defaults`` (``%llm_config``
    in a notebook): the caller's word.
``jupyterhub`` / ``os-user``
    a notebook's session user (``$JUPYTERHUB_USER``, else the OS account), set by ``%load_ext tidyllm``.

``governance.identity: declared`` takes the strongest source present for each of user and department
(authenticated, token, declared, then the notebook session); ``verified`` requires a verified source
(authenticated, token or notebook session) and refuses a declaration that disagrees with it, or a
department only declared. ``governance.user_departments`` maps users to their department when their
verified identity names none. ``governance.require`` lists the context every call must carry; and a
call without a department is refused whenever department budgets exist, so leaving the department
out never buys a call more room than naming it.

:func:`normalize_name` is the one normalisation of user and department names, used by the
budgets, the authorisation rules, the rate limits, the settings and the call rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from tidyllm.errors import ConfigurationError
from tidyllm.governance.names import normalize_name

if TYPE_CHECKING:
    from tidyllm.governance.context import CallContext
    from tidyllm.governance.tokens import TokenClaims, TokenKey
    from tidyllm.settings import GovernanceSettings

__all__ = ["normalize_name", "Identity", "IdentityResolver", "authenticated", "set_authenticated",
           "current_authenticated", "session_identity", "TOKEN_KEY", "MODES", "REQUIRABLE"]

log = logging.getLogger("tidyllm.governance")

#: the metadata key a caller passes its signed token under
TOKEN_KEY = "tidyllm_token"
#: values of ``governance.identity``
MODES = ("declared", "verified")
#: context keys ``governance.require`` may list
REQUIRABLE = ("department", "user_id", "audit_reason", "use_case", "data_sensitivity")


def _optional_name(value: str | None) -> str | None:
    if value is None:
        return None
    name = normalize_name(value)
    return name or None


@dataclass(frozen=True)
class Identity:
    """A user (and maybe a department) vouched for by ``source``; names are normalised."""

    user_id: str | None
    department: str | None = None
    #: authenticated, token, jupyterhub or os-user
    source: str = "authenticated"

    def __post_init__(self) -> None:
        for key in ("user_id", "department"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Identity.{key} must be a string, got {type(value).__name__}")
            object.__setattr__(self, key, _optional_name(value))


_AUTHENTICATED: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("tidyllm_authenticated",
                                                                                  default=None)


@contextlib.contextmanager
def authenticated(identity: Identity | None) -> Iterator[None]:
    """Run the LiteLLM calls in the block as ``identity`` — the seam for an entry point (a proxy's
    auth, a web service) that authenticated its caller. The identity follows the calls into threads
    started with ``asyncio.to_thread`` / ``contextvars.copy_context()`` and into tasks."""
    reset = set_authenticated(identity)
    try:
        yield
    finally:
        _AUTHENTICATED.reset(reset)


def set_authenticated(identity: Identity | None) -> contextvars.Token:
    """Make ``identity`` the authenticated caller of the current context from here on, for entry points
    whose authenticating code cannot wrap the call in :func:`authenticated` (a web framework's
    dependency or middleware running in the request's task). Returns the token that
    ``contextvars.ContextVar.reset`` takes to undo it."""
    if identity is not None and not isinstance(identity, Identity):
        raise TypeError(f"the authenticated identity must be a tidyllm Identity, got {type(identity).__name__}")
    return _AUTHENTICATED.set(identity)


def current_authenticated() -> Identity | None:
    """The identity set by the innermost :func:`authenticated` block, if any."""
    return _AUTHENTICATED.get()


def session_identity(environ: Mapping[str, str] | None = None) -> Identity:
    """A notebook's user: ``$JUPYTERHUB_USER`` (set by JupyterHub's spawner), else the OS account."""
    env = os.environ if environ is None else environ
    hub = env.get("JUPYTERHUB_USER")
    if hub and hub.strip():
        return Identity(hub, source="jupyterhub")
    import getpass

    return Identity(getpass.getuser(), source="os-user")


# --- the resolver -------------------------------------------------------------------------------------

class IdentityResolver:
    """Resolves, validates and normalises the caller context of each governed call.

    ``mode`` is ``declared`` or ``verified`` (see the module docstring); ``require`` the context keys
    every call must carry; ``defaults`` the configured defaults under each call's metadata;
    ``user_departments`` the department of each user whose verified identity names none;
    ``key_file`` the platform's token key; ``token`` this process's own caller token ($TIDYLLM_TOKEN);
    ``department_budgets()`` whether any department budget exists (a call without a department is
    refused then). The notebook extension sets :attr:`session` and :attr:`notebook` (``%llm_config``).
    """

    def __init__(self, *, mode: str = "declared", require: tuple[str, ...] = ("department",),
                 defaults: Mapping[str, str] | None = None,
                 sensitivity_classes: tuple[str, ...] = ("public", "internal", "confidential", "restricted"),
                 user_departments: Mapping[str, str] | None = None, key_file: str | os.PathLike[str] | None = None,
                 token: str | None = None, department_budgets: Callable[[], bool] | None = None) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"governance.identity must be one of {', '.join(MODES)}; got {mode!r}")
        unknown = [k for k in require if k not in REQUIRABLE]
        if unknown:
            raise ConfigurationError(f"governance.require: unknown key {unknown[0]!r}; use any of "
                                     f"{', '.join(REQUIRABLE)}")
        self.mode = mode
        self.require = tuple(require)
        self.defaults = dict(defaults or {})
        self.sensitivity_classes = tuple(sensitivity_classes)
        self.user_departments = {normalize_name(u): normalize_name(d) for u, d in (user_departments or {}).items()}
        self.key_file = Path(key_file) if key_file is not None else None
        self.token = token or None
        if self.token:
            from tidyllm.redact import register_secret

            register_secret(self.token)
        self.department_budgets = department_budgets
        #: the notebook's session user (``%load_ext tidyllm``), if any
        self.session: Identity | None = None
        #: the notebook's declared context (``%llm_config``), over ``defaults``
        self.notebook: dict[str, str] = {}
        self._key: "tuple[tuple[int, int], TokenKey] | None" = None
        #: tokens this key verified, with their claims (a token is checked once; its expiry on every call)
        self._claims: "dict[str, TokenClaims]" = {}

    @classmethod
    def from_settings(cls, settings: "GovernanceSettings", defaults: Mapping[str, str],
                      department_budgets: Callable[[], bool] | None = None) -> "IdentityResolver":
        """A resolver configured from the ``governance:`` settings section."""
        return cls(mode=settings.identity, require=settings.required(), defaults=defaults,
                   sensitivity_classes=tuple(settings.sensitivity_classes),
                   user_departments=settings.user_departments, key_file=settings.key_path(),
                   token=settings.token, department_budgets=department_budgets)

    # --- the notebook's part ----------------------------------------------------------------------

    def set_session(self, identity: Identity | None) -> None:
        """The notebook's session user (``jupyterhub`` or ``os-user``), or None."""
        self.session = identity

    def declare(self, context: Mapping[str, str | None]) -> None:
        """The notebook's declared context (``%llm_config``): replaces the previous one."""
        self.notebook = {k: v for k, v in context.items() if isinstance(v, str) and v.strip()}

    # --- tokens -----------------------------------------------------------------------------------

    def key(self) -> "TokenKey":
        """The platform's token key, re-read when its file changes (so a replaced key takes effect)."""
        from tidyllm.governance.tokens import TokenKey

        if self.key_file is None:
            raise ConfigurationError("no token key file is configured (governance.token_key_file)")
        try:
            st = self.key_file.stat()
        except FileNotFoundError:
            return TokenKey.load(self.key_file)  # raises the explanation
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._key
        if cached is None or cached[0] != stamp:
            cached = self._key = (stamp, TokenKey.load(self.key_file))
            self._claims = {}
        return cached[1]

    def _token_identity(self, token: Any) -> Identity:
        from tidyllm.errors import MetadataError, TokenError

        if not isinstance(token, str):
            err = MetadataError(f"metadata[{TOKEN_KEY!r}] must be the string `tidyllm token issue` printed, got "
                                f"{type(token).__name__}")
            err.rule = "identity:token-malformed"
            raise err
        try:
            key = self.key()
            claims = self._claims.get(token)
            if claims is None or claims.expires_at <= time.time():
                claims = key.verify(token)
                if len(self._claims) >= 4096:
                    self._claims = {}
                self._claims[token] = claims
        except TokenError as exc:
            err = MetadataError(str(exc))
            err.rule = f"identity:token-{exc.kind}"
            raise err from None
        except ConfigurationError as exc:
            err = MetadataError(f"a caller token was presented but cannot be verified: {exc}")
            err.rule = "identity:token-key"
            raise err from None
        return Identity(claims.user_id, claims.department, source="token")

    # --- resolution ---------------------------------------------------------------------------------

    def resolve(self, metadata: Any, *, authenticated: Identity | None = None) -> "CallContext":
        """The validated context of one call. Raises :class:`~tidyllm.errors.MetadataError` (its ``rule``
        starts ``identity:``, or is ``metadata``) for a refused identity or missing required context."""
        from tidyllm.governance.context import CallContext

        declared = CallContext.from_metadata(metadata, defaults={**self.defaults, **self.notebook}
                                             if self.notebook else self.defaults,
                                             sensitivity_classes=self.sensitivity_classes)
        vouched = authenticated or _AUTHENTICATED.get()
        token = metadata.get(TOKEN_KEY) if metadata else None
        if token is not None:  # a token sent with a call is always checked: a bad one is refused
            signed = self._token_identity(token)
            vouched = vouched or signed
        elif vouched is None and self.token:
            vouched = self._token_identity(self.token)
        session = self.session
        if self.mode == "verified":
            user, dept, user_src, dept_src = self._verified(declared, vouched or session)
        else:
            user, dept, user_src, dept_src = self._declared(declared, vouched, session)
        if user and not dept and user in self.user_departments:
            dept, dept_src = self.user_departments[user], user_src
        ctx = CallContext(user_id=user, department=dept, audit_reason=declared.audit_reason,
                          use_case=declared.use_case, data_sensitivity=declared.data_sensitivity, extra=declared.extra,
                          identity_source=_source(user_src if user else None, dept_src if dept else None))
        for key in self.require:
            if not getattr(ctx, key):
                raise _missing(key)
        if not ctx.department and self.department_budgets is not None and self.department_budgets():
            from tidyllm.errors import MetadataError

            err = MetadataError("department budgets are set on this platform, so a call without a department is "
                                "refused (it would escape them): pass metadata={'department': ...} (or "
                                "%llm_config department=... in a notebook)")
            err.rule = "identity:missing-department"
            raise err
        return ctx

    @staticmethod
    def _declared(declared: "CallContext", vouched: Identity | None,
                  session: Identity | None) -> tuple[str | None, str | None, str | None, str | None]:
        """declared mode: authenticated or token, then the declaration, then the notebook session."""
        user, user_src = declared.user_id, "declared"
        dept, dept_src = declared.department, "declared"
        if vouched is not None:
            if vouched.user_id:
                if user and user != vouched.user_id:
                    log.warning("declared user %r ignored: the call is %s as %r", user, vouched.source,
                                vouched.user_id)
                user, user_src = vouched.user_id, vouched.source
            if vouched.department:
                if dept and dept != vouched.department:
                    log.warning("declared department %r ignored: the call is %s for %r", dept, vouched.source,
                                vouched.department)
                dept, dept_src = vouched.department, vouched.source
        if session is not None:
            if not user and session.user_id:
                user, user_src = session.user_id, session.source
            if not dept and session.department:
                dept, dept_src = session.department, session.source
        return user, dept, user_src, dept_src

    def _verified(self, declared: "CallContext",
                  vouched: Identity | None) -> tuple[str | None, str | None, str | None, str | None]:
        """verified mode: the identity comes from a verified source; a declaration may only agree with it."""
        from tidyllm.errors import MetadataError

        def refuse(rule: str, message: str) -> MetadataError:
            err = MetadataError(message)
            err.rule = rule
            return err

        if vouched is None or not vouched.user_id:
            raise refuse("identity:unverified",
                         "this platform verifies identity (governance.identity: verified) and the call carries none: "
                         "pass a signed token (metadata={'tidyllm_token': ...} or $TIDYLLM_TOKEN, from `tidyllm token "
                         "issue`) or call through an authenticated entry point")
        user = vouched.user_id
        if declared.user_id and declared.user_id != user:
            raise refuse("identity:user-mismatch", f"declared user {declared.user_id!r} disagrees with user {user!r} "
                                                   f"verified by {vouched.source}: drop user_id or use your own")
        dept = vouched.department or self.user_departments.get(user)
        if declared.department and declared.department != dept:
            if dept is None:
                raise refuse("identity:department-unverified",
                             f"department {declared.department!r} is only declared, and this platform verifies "
                             f"identity: user {user!r} ({vouched.source}) has no verified department; issue a token "
                             "with --department or add the user to governance.user_departments")
            raise refuse("identity:department-mismatch",
                         f"declared department {declared.department!r} disagrees with department {dept!r} of user "
                         f"{user!r} verified by {vouched.source}: the call is refused")
        return user, dept, vouched.source, vouched.source


def _source(user_src: str | None, dept_src: str | None) -> str | None:
    """One word when user and department came from one source, else ``user-source/department-source``."""
    if user_src is None or dept_src is None or user_src == dept_src:
        return user_src or dept_src
    return f"{user_src}/{dept_src}"


_MISSING = {
    "department": "this platform requires a department on every call: pass metadata={'department': ...} (or "
                  "%llm_config department=... in a notebook, or TIDYLLM_DEPARTMENT)",
    "user_id": "this platform requires a user on every call: pass metadata={'user_id': ...} (or %llm_config "
               "user=... in a notebook, TIDYLLM_USER, or a signed token)",
    "audit_reason": "this platform requires an audit reason: pass metadata={'audit_reason': 'why you make this "
                    "call', ...} (or %llm_config reason=... in a notebook)",
}


def _missing(key: str) -> Exception:
    from tidyllm.errors import MetadataError

    default = f"this platform requires {key} on every call: pass metadata={{{key!r}: ...}}"
    err = MetadataError(_MISSING.get(key, default))
    err.rule = "metadata" if key == "audit_reason" else f"identity:missing-{key.replace('_id', '')}"
    return err
