"""Who is calling: the bearer token -> a `Principal` (a tenant's name, role and limits).

A conversation belongs to the principal that created it: the store keys every conversation by
(owner, session id), so another key asking for the same id simply finds nothing (404, the same answer
as for an id that never existed - no existence leak) and two tenants may use the same id without
meeting. Without any configured key every caller is the one `anonymous` admin (the server is then
bound to loopback unless the operator said `--allow-unauthenticated`).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from .config import KeyLimits, ServeArgs, Tenant, hash_key
from .errors import APIError

ANONYMOUS = "anonymous"
KEY_PREFIX = "sk-ctxmem-"


@dataclass(frozen=True)
class Principal:
    name: str  # owns conversations; unique per key
    role: str  # "user" | "admin"
    limits: KeyLimits

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class Authenticator:
    def __init__(self, args: ServeArgs):
        self.by_hash = {t.sha256: t for t in args.tenants}
        self.default_limits = args.limits
        self.anonymous = Principal(ANONYMOUS, "admin", args.limits)

    @property
    def required(self) -> bool:
        return bool(self.by_hash)

    def principal(self, authorization: str | None) -> Principal:
        """The caller of a request with this Authorization header, or a 401 that says what to send."""
        if not self.by_hash:
            return self.anonymous
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
        tenant = self.by_hash.get(hash_key(token.strip()))  # a lookup by sha256: no timing signal on the key
        if tenant is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")
        return Principal(tenant.name, tenant.role, tenant.limits.over(self.default_limits))

    def optional(self, authorization: str | None) -> Principal | None:
        """The caller if the header names a valid key, else None (routes that answer anyone, less)."""
        try:
            return self.principal(authorization)
        except APIError:
            return None

    @staticmethod
    def require_admin(who: Principal) -> None:
        if not who.admin:
            raise APIError(403, f"this route needs an admin key; the key {who.name!r} has the role 'user' "
                           "(give it role: admin in the API keys file, or use an admin key)", code="admin_required")


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def tenant_entry(name: str, role: str, key: str) -> Tenant:
    return Tenant(name=name, role=role, sha256=hash_key(key))
