"""tidyllm inside LiteLLM's proxy: key authentication, identity, OpenAI-style refusals, governed streams.

:class:`ProxyGovernance` is one ``CustomLogger`` registered by the proxy's config (next to the
platform's own callbacks, which admit and settle every call in ``async_pre_call_deployment_hook``
and the success/failure events):

- :meth:`~ProxyGovernance.authenticate` is the proxy's ``general_settings.custom_auth``: it checks
  the request's key against the mart (:class:`~tidyllm.proxy.keys.KeyStore`) and returns the
  identity as LiteLLM's ``UserAPIKeyAuth`` — no Prisma database;
- ``async_pre_call_hook`` makes the authenticated identity the one tidyllm governs with: it writes
  the key's user and department into the request's metadata, refuses (and audits) a request whose
  declared department, user or OpenAI ``user`` field contradicts the key, and enforces the key's
  allowed routes. Under LiteLLM's own virtual keys, the key's team (``team_alias``, else
  ``team_id``) is the department and its ``user_id`` the user;
- ``async_post_call_failure_hook`` turns a governance refusal into the HTTP status and
  OpenAI-style error body an SDK understands (:mod:`tidyllm.proxy.errors`), with one log line;
- ``async_post_call_streaming_iterator_hook`` passes a governed stream through
  :class:`~tidyllm.litellm_bridge.streams.AsyncGovernedStream`, so a client that disconnects mid-stream
  is charged for what it was sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator

from litellm.integrations.custom_logger import CustomLogger

from tidyllm.governance.context import STAMP_KEY
from tidyllm.proxy.errors import IDENTITY_RULE, KeyRefusedError, find_refusal, http_error
from tidyllm.proxy.keys import Identity, KeyRefused

if TYPE_CHECKING:
    from tidyllm.platform import Platform
    from tidyllm.proxy.keys import KeyStore

__all__ = ["ProxyGovernance", "RefusalLogFilter", "identity_of"]

log = logging.getLogger("tidyllm.proxy")

#: metadata keys of ``UserAPIKeyAuth`` that carry a tidyllm key's identity
_ID, _DEPT, _USER, _ROUTES = "tidyllm_key_id", "tidyllm_department", "tidyllm_user", "tidyllm_routes"
#: paths a tidyllm key may use: the calls tidyllm governs (chat completions and embeddings, streamed or not)
#: and the model listings — never LiteLLM's admin API, its other pass-through endpoints (files, batches,
#: images...), nor ``/health``, whose model checks call every provider outside governance
_ALLOWED_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings",
                            "/v1/models", "/models", "/model/info", "/v1/model/info", "/model_group/info"})


def identity_of(auth: Any) -> Identity | None:
    """The identity a request authenticated as: a tidyllm key, else a LiteLLM virtual key's team as the
    department (``team_alias``, else ``team_id``) with its ``user_id``; None for a caller with neither."""
    md = getattr(auth, "metadata", None) or {}
    if isinstance(md, dict) and md.get(_ID) and md.get(_DEPT):
        return Identity(key_id=str(md[_ID]), department=str(md[_DEPT]), user_id=md.get(_USER) or None,
                        routes=tuple(md.get(_ROUTES) or ()))
    team = getattr(auth, "team_alias", None) or getattr(auth, "team_id", None)
    if team:
        routes = tuple(getattr(auth, "models", None) or ())
        return Identity(key_id=str(getattr(auth, "token", None) or getattr(auth, "key_alias", None) or "litellm"),
                        department=str(team), user_id=getattr(auth, "user_id", None) or None,
                        routes=routes if "*" not in routes else ())
    return None


class ProxyGovernance(CustomLogger):
    """tidyllm's proxy hooks (see :mod:`tidyllm.proxy.hooks`)."""

    def __init__(self, platform: "Platform", keys: "KeyStore") -> None:
        super().__init__()
        self.platform = platform
        self.keys = keys
        # a public string attribute: LiteLLM de-duplicates callbacks with equal simple attributes
        self.tidyllm_proxy = platform.mart.store.safe_url
        self._governed: Any = None

    # --- authentication (general_settings.custom_auth) --------------------------------------------

    async def authenticate(self, request: Any, api_key: str | None) -> Any:
        """LiteLLM's ``custom_auth``: the key's identity as a ``UserAPIKeyAuth``; 401 for a refused key."""
        from litellm.proxy._types import UserAPIKeyAuth

        path = str(request.url.path)
        if path.startswith("/health/liveliness") or path.startswith("/health/readiness"):
            return UserAPIKeyAuth()  # the probes a load balancer sends carry no key
        client = request.client.host if getattr(request, "client", None) else None
        try:
            identity = await asyncio.to_thread(self.keys.check, api_key, client=client, route=path)
        except KeyRefused as refused:
            # one log line (async_post_call_failure_hook), HTTP 401 with an OpenAI-style body
            RefusalLogFilter.remember(str(refused))
            raise KeyRefusedError(str(refused), reason=refused.reason) from None
        if path.rstrip("/") not in _ALLOWED_PATHS:
            from tidyllm.errors import RouteNotAuthorizedError

            raise RouteNotAuthorizedError(f"{path} is not part of the API a tidyllm key may use (LiteLLM's "
                                          "management API needs its own database and master key)",
                                          rule="proxy_key:path")
        return UserAPIKeyAuth(
            api_key=identity.key_id, token=identity.key_id, user_id=identity.user_id,
            team_id=identity.department, team_alias=identity.department,
            metadata={_ID: identity.key_id, _DEPT: identity.department, _USER: identity.user_id,
                      _ROUTES: list(identity.routes)})

    # --- identity (before routing) --------------------------------------------------------------

    def _govern_router(self) -> None:
        """Put tidyllm's governed strategy on the proxy's Router (once per Router object): a group's route is
        then chosen among the authorised, healthy, affordable ones (by the learning router), every attempt
        — a retry included — is admitted on its own, and streams are settled however they end."""
        from litellm.proxy import proxy_server

        router = getattr(proxy_server, "llm_router", None)
        if router is None or router is self._governed:
            return
        config = self.platform.gateway.config
        names = {r.name for r in config.routes} if config is not None else set()
        self.platform.govern(router, gateway_routes=names)
        self._governed = router

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        self._govern_router()
        identity = identity_of(user_api_key_dict)
        key = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) and "metadata" not in data \
            else "metadata"
        md = data.get(key)
        if md is None:
            md = {}
        kind = getattr(call_type, "value", str(call_type or "completion"))
        model = str(data.get("model") or "")
        if not isinstance(md, dict):
            await self._refuse_metadata(f"metadata must be a JSON object like {{'audit_reason': '...'}}, got "
                                        f"{type(md).__name__}", {}, identity, model, kind, data)
        if STAMP_KEY in md:
            # only tidyllm's own gate writes this key: a client that sends one is forging an admission
            await self._refuse_metadata(f"metadata[{STAMP_KEY!r}] is reserved for tidyllm; remove it from the "
                                        "request", md, identity, model, kind, data, rule=f"{IDENTITY_RULE}:forged")
        if identity is None:
            return data  # no key identity (a proxy run without tidyllm's keys): the declared context governs
        user_id = await self._user(identity, md, data, model, kind)
        declared = md.get("department")
        if declared not in (None, "", identity.department):
            await self._refuse_metadata(
                f"this key is bound to department {identity.department!r}; the request's metadata claims "
                f"{declared!r}. Use a key issued to {declared!r}, or leave the department out",
                md, identity, model, kind, data, rule=f"{IDENTITY_RULE}:department", user=user_id)
        if not identity.allows(model):
            from tidyllm.errors import RouteNotAuthorizedError

            err = RouteNotAuthorizedError(
                f"this key may call {', '.join(identity.routes)}; not {model!r}. Ask for a key with "
                f"`tidyllm keys create --routes`", rule="proxy_key:routes")
            await self._audit_refusal(err, md, identity, model, kind, data, user=user_id)
        data[key] = {**md, "department": identity.department, "user_id": user_id}
        # the key's identity as the authenticated caller of this request's task: the gate then records its
        # source, and in governance.identity: verified mode it is the identity that counts
        from tidyllm.governance.identity import Identity as Caller, set_authenticated

        set_authenticated(Caller(user_id, identity.department, source="proxy-key"))
        return data

    async def _user(self, identity: Identity, md: dict, data: dict, model: str, kind: str) -> str | None:
        """The user the call is governed as: the key's user, else the OpenAI ``user`` field, else the declared
        metadata user_id; a claim that contradicts the key's user (or each other) is refused."""
        field = data.get("user") if isinstance(data.get("user"), str) and data.get("user") else None
        declared = md.get("user_id") if isinstance(md.get("user_id"), str) and md.get("user_id") else None
        if identity.user_id is not None:
            for what, value in (("the OpenAI `user` field", field), ("metadata user_id", declared)):
                if value is not None and value != identity.user_id:
                    await self._refuse_metadata(
                        f"this key is bound to user {identity.user_id!r}; {what} says {value!r}. Leave it out, "
                        "or use an application key (created without --user) that serves many users",
                        md, identity, model, kind, data, rule=f"{IDENTITY_RULE}:user", user=identity.user_id)
            return identity.user_id
        if field is not None and declared is not None and field != declared:
            await self._refuse_metadata(f"the OpenAI `user` field says {field!r} and metadata user_id says "
                                        f"{declared!r}; send one of them", md, identity, model, kind, data,
                                        rule=f"{IDENTITY_RULE}:user")
        return field or declared

    async def _refuse_metadata(self, message: str, md: dict, identity: Identity | None, model: str, kind: str,
                               data: dict, *, rule: str | None = None, user: str | None = None) -> None:
        from tidyllm.errors import MetadataError

        err = MetadataError(message)
        if rule:
            err.rule = rule
        await self._audit_refusal(err, md, identity, model, kind, data, user=user)

    async def _audit_refusal(self, err: Exception, md: dict, identity: Identity | None, model: str, kind: str,
                             data: dict, *, user: str | None = None) -> None:
        """Audit ``err`` against the key's own identity (never the claimed one) and raise it."""
        claimed = {k: v for k, v in md.items() if k != STAMP_KEY} if isinstance(md, dict) else {}
        if identity is not None:
            claimed.update(department=identity.department, user_id=user or identity.user_id)
        text = data.get("input") if "embed" in kind else data.get("messages")
        try:
            await asyncio.to_thread(self.platform.governor.refuse_metadata, err, metadata=claimed, route=model,
                                    requested_model=model, call_type=kind, messages=text)
        except type(err):
            pass
        raise err

    # --- refusals an SDK understands ------------------------------------------------------------

    async def async_post_call_failure_hook(self, request_data: dict, original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: str | None = None) -> Any:
        refusal = find_refusal(original_exception)
        if refusal is None:
            return None
        from fastapi import HTTPException

        status, kind, headers = http_error(refusal)
        # LiteLLM's Router appends its own paragraph to the exception's message; tidyllm's is the first line
        message = (str(refusal).strip().splitlines() or [type(refusal).__name__])[0]
        RefusalLogFilter.remember(message)
        log.warning("proxy: refused %s (HTTP %d, %s): %s", request_data.get("model") or "request", status,
                    getattr(refusal, "rule", "governance"), message)
        exc = HTTPException(status_code=status, detail=message, headers=headers)
        exc.type = kind  # type: ignore[attr-defined] - read by the proxy as the OpenAI error type
        return exc

    # --- streams --------------------------------------------------------------------------------

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict) -> AsyncIterator[Any]:
        from tidyllm.litellm_bridge.records import stream_token
        from tidyllm.litellm_bridge.streams import AsyncGovernedStream, StreamTally

        if isinstance(response, AsyncGovernedStream):
            stream, tally = response, response.tally  # governed by the Router (tidyllm's strategy)
        else:
            token = stream_token(response)
            admission = self.platform.governor.seals.peek(token)
            if admission is None:
                async for chunk in response:
                    yield chunk
                return
            tally = StreamTally(admission, token, request_data.get("messages"), request_data.get("tools"))
            stream = AsyncGovernedStream(response, self.platform.governor, tally)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            if not tally.completed and not tally.settled.is_set():
                # the client went away (the proxy closed or cancelled this generator): charge what was sent
                await asyncio.shield(stream.aclose())


class RefusalLogFilter(logging.Filter):
    """Keeps governance refusals to one line in the proxy's log: LiteLLM logs each failed request (with its
    traceback, from the router and from the proxy); for a tidyllm refusal those records are dropped, and
    :meth:`ProxyGovernance.async_post_call_failure_hook` writes the one line. A record is a refusal's when
    it carries one as its exception, names a refusal class, or quotes a refusal message seen recently."""

    _NAMES = ("BudgetExceededError", "RouteNotAuthorizedError", "RateLimitedError", "MetadataError",
              "UnpricedModelError", "KeyRefusedError", "tidyllm.errors", "tidyllm.proxy.errors")
    #: the messages of recent refusals (LiteLLM's auth handler logs a refused key by its message alone)
    _recent: "deque[str]" = deque(maxlen=256)

    @classmethod
    def remember(cls, message: str) -> None:
        """Drop LiteLLM's records that quote ``message`` from now on."""
        if message:
            cls._recent.append(message)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and find_refusal(record.exc_info[1]) is not None:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(a, BaseException) and find_refusal(a) is not None for a in args):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not (any(name in text for name in self._NAMES) or any(m in text for m in list(self._recent)))
