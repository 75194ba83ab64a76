"""Talking to a running MLflow gateway of either flavour: URLs, credentials, endpoint listing.

The two flavours differ, from LiteLLM's side, only in the ``api_base`` (``{uri}/v1`` for the
legacy YAML server, ``{uri}/gateway/mlflow/v1`` for the tracking server) and, when the tracking
server runs MLflow's ``basic-auth`` app, in one header. On ``/gateway/*`` routes MLflow reads
``X-MLflow-Authorization: Basic ...`` first (``mlflow/server/auth/__init__.py``,
``_authenticate_fastapi_request``) because ``Authorization`` carries the provider key LiteLLM
sends, and it strips that header before calling the provider; its REST API (``/api/...``)
reads ``Authorization``. Credentials come from arguments or MLflow's standard variables
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; they are never logged or stored.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Mapping

from tidyllm.errors import GatewayError

__all__ = [
    "MODES",
    "api_base",
    "auth_headers",
    "detect_mode",
    "embeddings_api_base",
    "list_endpoints",
    "resolve_auth",
]

MODES = ("legacy", "server")
_CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
_GATEWAY_REST = "/api/3.0/mlflow/gateway"
#: endpoint tags tidyllm writes on the tracking server (see tidyllm.gateway.sync)
TAG_ENDPOINT_TYPE = "tidyllm.endpoint_type"

Auth = tuple[str, str]


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise GatewayError(f"unknown gateway mode {mode!r}; use 'legacy' (mlflow gateway start) or 'server' "
                           f"(mlflow server)")
    return mode


def api_base(uri: str, mode: str) -> str:
    """The OpenAI-compatible base URL LiteLLM calls (``model="openai/<endpoint>"``) for chat and completions."""
    uri = uri.rstrip("/")
    return f"{uri}/v1" if _check_mode(mode) == "legacy" else f"{uri}/gateway/mlflow/v1"


def embeddings_api_base(uri: str, mode: str) -> str:
    """The base URL for ``litellm.embedding``: the tracking server has no ``/gateway/mlflow/v1/embeddings``.

    It serves embeddings on its OpenAI passthrough, ``/gateway/openai/v1/embeddings`` (``model`` =
    endpoint name), so LiteLLM's ``openai/`` provider reaches it with this base.
    """
    uri = uri.rstrip("/")
    return f"{uri}/v1" if _check_mode(mode) == "legacy" else f"{uri}/gateway/openai/v1"


def resolve_auth(username: str | None = None, password: str | None = None,
                 environ: Mapping[str, str] | None = None) -> Auth | None:
    """Credentials for the tracking server: the arguments, else ``MLFLOW_TRACKING_USERNAME/PASSWORD``.

    ``None`` when neither is given (a server without authentication). Half a credential is an error.
    """
    env = os.environ if environ is None else environ
    if username is None and password is None:
        username = env.get("MLFLOW_TRACKING_USERNAME") or None
        password = env.get("MLFLOW_TRACKING_PASSWORD") or None
    if username is None and password is None:
        return None
    if not username or not password:
        missing = "MLFLOW_TRACKING_USERNAME" if not username else "MLFLOW_TRACKING_PASSWORD"
        raise GatewayError(f"an MLflow credential needs both a user name and a password; {missing} is "
                           f"missing: set {_CREDENTIAL_VARS}")
    return username, password


def auth_headers(username: str, password: str) -> dict[str, str]:
    """Headers LiteLLM must send to a tracking-server gateway that runs MLflow's basic-auth app.

    Pass them as ``extra_headers``; ``api_key`` stays whatever the provider needs (MLflow
    ignores it). The value is a secret: do not log the returned mapping.
    """
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"X-MLflow-Authorization": f"Basic {token}"}


class RestClient:
    """Thin httpx client for the tracking server's REST API, translating failures into GatewayError."""

    def __init__(self, uri: str, auth: Auth | None = None, timeout: float = 30.0) -> None:
        import httpx

        self.uri = uri.rstrip("/")
        self.auth = auth
        self._http = httpx.Client(base_url=self.uri, timeout=timeout,
                                  auth=httpx.BasicAuth(*auth) if auth else None)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "RestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None) -> dict[str, Any]:
        """Call ``path`` and return its JSON body; any failure is a :class:`GatewayError`."""
        import httpx

        try:
            response = self._http.request(method, path, params=params, json=json)
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the MLflow server at {self.uri}: {exc}; is it running? "
                               f"Start one with `tidyllm gateway start --mode server`") from exc
        if response.status_code in (401, 403):
            raise auth_error(self.uri, response.status_code, self.auth)
        if response.status_code >= 400:
            raise GatewayError(f"MLflow server at {self.uri} answered {method} {path} with HTTP "
                               f"{response.status_code}: {_message(response)}")
        return response.json() if response.content else {}

    def gateway(self, method: str, action: str, **kwargs: Any) -> dict[str, Any]:
        """Call the AI Gateway REST API, e.g. ``gateway("GET", "endpoints/list")``."""
        return self.request(method, f"{_GATEWAY_REST}/{action}", **kwargs)


def auth_error(uri: str, status: int, auth: Auth | None) -> GatewayError:
    """The error for a 401/403 from MLflow, saying which variables to set (never the password)."""
    if status == 403:
        return GatewayError(f"the MLflow server at {uri} refused user {auth[0] if auth else '(none)'!r} "
                            f"(HTTP 403): the user lacks permission for the AI Gateway; ask an MLflow admin")
    if auth is None:
        return GatewayError(f"the MLflow server at {uri} requires authentication (HTTP 401); set {_CREDENTIAL_VARS}"
                            f" (or pass the credentials explicitly)")
    return GatewayError(f"the MLflow server at {uri} rejected the credentials of user {auth[0]!r} (HTTP 401); "
                        f"check {_CREDENTIAL_VARS}")


def _message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        detail = body.get("message") or body.get("detail") or body
        return str(detail)[:500]
    return str(body)[:500]


def detect_mode(uri: str, auth: Auth | None = None, timeout: float = 10.0) -> str:
    """``"server"`` if ``uri`` is a tracking server with the AI Gateway, ``"legacy"`` if a YAML gateway."""
    import httpx

    try:
        response = httpx.get(f"{uri.rstrip('/')}{_GATEWAY_REST}/endpoints/list", timeout=timeout,
                             auth=httpx.BasicAuth(*auth) if auth else None)
    except httpx.HTTPError as exc:
        raise GatewayError(f"cannot reach the MLflow gateway at {uri}: {exc}; is it running? "
                           f"Start one with `tidyllm gateway start`") from exc
    if response.status_code == 404:
        return "legacy"
    if response.status_code == 501:
        raise GatewayError(f"the MLflow server at {uri} has its AI Gateway disabled (MLFLOW_ENABLE_AI_GATEWAY=false)")
    return "server"


def list_endpoints(uri: str, mode: str | None = None, auth: Auth | None = None) -> list[dict[str, Any]]:
    """What a running gateway serves: one dict per endpoint with ``name``, ``endpoint_type``, ``model``, ``provider``.

    ``mode`` is detected when ``None``; ``auth`` defaults to ``MLFLOW_TRACKING_USERNAME/PASSWORD``.
    On the tracking server, ``endpoint_type`` comes from the tag tidyllm sets when it provisions
    an endpoint (``None`` for endpoints made elsewhere, which MLflow does not type), and ``model``
    and ``provider`` are those of the primary model (the first one, for a traffic split).
    """
    auth = auth if auth is not None else resolve_auth()
    mode = _check_mode(mode) if mode is not None else detect_mode(uri, auth)
    with RestClient(uri, auth) as rest:
        if mode == "legacy":
            out, token = [], None
            while True:
                page = rest.request("GET", "/api/2.0/endpoints/", params={"page_token": token} if token else None)
                for item in page.get("endpoints", []):
                    model = item.get("model") or {}
                    out.append({"name": item["name"], "endpoint_type": item.get("endpoint_type"),
                                "model": model.get("name"), "provider": model.get("provider")})
                token = page.get("next_page_token")
                if not token:
                    return out
        page = rest.gateway("GET", "endpoints/list")
        out = []
        for item in page.get("endpoints", []):
            mappings = item.get("model_mappings", [])
            primary = next((m for m in mappings if m.get("linkage_type") == "PRIMARY"), mappings[0] if mappings else {})
            definition = primary.get("model_definition") or {}
            tags = {t["key"]: t.get("value") for t in item.get("tags", [])}
            out.append({"name": item.get("name"), "endpoint_type": tags.get(TAG_ENDPOINT_TYPE),
                        "model": definition.get("model_name"), "provider": definition.get("provider")})
        return out
