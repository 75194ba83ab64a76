"""Signed caller tokens: ``tidyllm token issue --user ana --department risk --ttl 8h``.

A token is ``tlm1.<claims>.<signature>``: base64url JSON claims (user, department, issue and expiry
times, the signing key's id, a random token id) and an HMAC-SHA256 over them under the platform's
key. The key (:class:`TokenKey`) is a file outside the database, so a copy of the database never
lets anyone mint a token; its id travels in every token, so another platform's token is told apart
from an altered one. Services pass a token as ``metadata={"tidyllm_token": ...}`` or ``$TIDYLLM_TOKEN``;
:class:`tidyllm.governance.identity.IdentityResolver` verifies it on each call.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from tidyllm.errors import ConfigurationError, TokenError
from tidyllm.governance.names import normalize_name

__all__ = ["TokenKey", "TokenClaims", "parse_ttl"]

_TOKEN_PREFIX = "tlm1"
#: a token issued this far in the future is refused (clocks of issuer and verifier disagree this much)
_CLOCK_SKEW_S = 300


def _optional_name(value: str | None) -> str | None:
    return (normalize_name(value) or None) if value is not None else None


_TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_ttl(text: str) -> int:
    """Seconds in a lifetime like ``8h``, ``30m``, ``7d``, ``2w`` or ``3600`` (seconds)."""
    match = _TTL.match(str(text))
    seconds = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
    if seconds <= 0:
        raise ConfigurationError(f"a token lifetime must be a positive duration like 8h, 30m, 7d or 3600; got {text!r}")
    return seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says: who, which department, when it was issued and when it expires."""

    user_id: str
    department: str | None
    issued_at: int
    expires_at: int
    #: the signing key's id (a fingerprint, not the key)
    key_id: str
    #: the token's own random id
    token_id: str


class TokenKey:
    """The platform's token signing key: 32 random bytes, hex, in a file only its owner may read (0600),
    outside the database (a copy of the database never lets anyone mint tokens). Replacing the file
    invalidates every token issued with the old key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ConfigurationError("a token key needs at least 32 bytes")
        self._secret = secret
        #: a public fingerprint naming the key (tokens carry it, so another platform's token is told apart)
        self.key_id = hashlib.sha256(b"tidyllm-token-key-id:" + secret).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"<TokenKey {self.key_id}>"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TokenKey":
        """Read the key file; :class:`~tidyllm.errors.ConfigurationError` when it is missing, readable by
        others, or not a key."""
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise ConfigurationError(f"no token key at {path}: create it with `tidyllm token issue` (or point "
                                     "governance.token_key_file / $TIDYLLM_TOKEN_KEY_FILE at the platform's "
                                     "key)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read the token key {path}: {exc}") from exc
        if os.name == "posix" and st.st_mode & 0o077:
            raise ConfigurationError(f"the token key {path} may be read by others (mode {st.st_mode & 0o777:o}); "
                                     f"run `chmod 600 {path}`")
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise ConfigurationError(f"{path} is not a tidyllm token key (expected 64 hex digits)") from None
        return cls(secret)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> "TokenKey":
        """Write a new random key to ``path`` (mode 0600; refuses to overwrite an existing file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(f"a token key already exists at {path}") from None
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secret.hex() + "\n")
        return cls(secret)

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode("ascii"), hashlib.sha256).digest())

    def issue(self, user_id: str, department: str | None = None, *, ttl_seconds: int,
              now: float | None = None) -> str:
        """A token for ``user_id`` (and ``department``), valid for ``ttl_seconds``."""
        user = _optional_name(user_id) if isinstance(user_id, str) else None
        if not user:
            raise ConfigurationError("a token needs the user it identifies (--user)")
        dept = _optional_name(department) if department is not None else None
        if ttl_seconds <= 0:
            raise ConfigurationError(f"a token lifetime must be positive, got {ttl_seconds} s")
        issued = int(now if now is not None else time.time())
        claims = {"v": 1, "kid": self.key_id, "sub": user, "dept": dept, "iat": issued,
                  "exp": issued + int(ttl_seconds), "jti": secrets.token_hex(8)}
        body = f"{_TOKEN_PREFIX}.{_b64(json.dumps(claims, separators=(',', ':'), sort_keys=True).encode())}"
        return f"{body}.{self._sign(body)}"

    def verify(self, token: str, *, now: float | None = None) -> TokenClaims:
        """The claims of a valid token; :class:`~tidyllm.errors.TokenError` (``kind`` malformed,
        wrong-platform, tampered or expired) otherwise. Messages never contain the token."""
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3 or parts[0] != _TOKEN_PREFIX:
            raise TokenError("malformed", "the caller token is not a tidyllm token (expected "
                                          "tlm1.<claims>.<signature>, as `tidyllm token issue` prints)")
        try:
            claims = json.loads(_unb64(parts[1]))
            user, kid = claims["sub"], claims["kid"]
            issued, expires = int(claims["iat"]), int(claims["exp"])
            dept = claims.get("dept")
            if not isinstance(user, str) or not isinstance(kid, str) or not (dept is None or isinstance(dept, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise TokenError("malformed", "the caller token's claims cannot be read: issue a new one with "
                                          "`tidyllm token issue`") from None
        who = f"user {user!r}" + (f" of department {dept!r}" if dept else "")
        if not hmac.compare_digest(kid, self.key_id):
            raise TokenError("wrong-platform", f"the caller token for {who} was signed by another platform's key "
                                               f"({kid}, this platform's is {self.key_id}): issue one here with "
                                               "`tidyllm token issue`")
        if not hmac.compare_digest(parts[2], self._sign(f"{parts[0]}.{parts[1]}")):
            raise TokenError("tampered", f"the caller token claiming {who} does not match its signature: it was "
                                         "altered; issue a new one with `tidyllm token issue`")
        at = now if now is not None else time.time()
        if expires <= at:
            ago = _duration(at - expires)
            raise TokenError("expired", f"the caller token for {who} expired {ago} ago: issue a new one with "
                                        "`tidyllm token issue`")
        if issued > at + _CLOCK_SKEW_S:
            raise TokenError("malformed", f"the caller token for {who} is dated {_duration(issued - at)} in the "
                                          "future: check the clocks of the issuing and the verifying hosts")
        return TokenClaims(user_id=user, department=dept, issued_at=issued, expires_at=expires, key_id=kid,
                           token_id=str(claims.get("jti") or ""))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}".replace(".0", "")
    return f"{seconds}s"
