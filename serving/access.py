"""Who may call what, and which prefix-cache namespace each request gets.

Clients present an API key (`Authorization: Bearer KEY`, the scheme in any case). Operator routes (metrics,
the server's memory and programs) take the admin key when one is set. The prefix cache is shared by every
request with the same cache salt; `cache_isolation` decides who shares: "none" (the client's `cache_salt`
alone), "api-key" (each API key its own namespace) or "header" (the tenant named by a header that a trusted
proxy sets). A client's own `cache_salt` splits its namespace further, never joins another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from starlette.datastructures import Headers

from serving.errors import APIError

ISOLATION = ("none", "api-key", "header")
DEFAULT_TENANT_HEADER = "X-Tenant-Id"


@dataclasses.dataclass(frozen=True)
class Access:
    api_keys: tuple[str, ...] = ()  # any of these lets a client in (none: no key needed)
    admin_key: str | None = None  # operator routes (default: any API key; none set: open)
    cache_isolation: str = "none"
    tenant_header: str = DEFAULT_TENANT_HEADER
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); none: CORS off

    def __post_init__(self) -> None:
        if self.cache_isolation not in ISOLATION:
            raise ValueError(f"cache_isolation must be one of {', '.join(ISOLATION)}, got {self.cache_isolation!r}")
        if self.cache_isolation == "api-key" and not self.api_keys:
            raise ValueError("cache isolation per API key needs API keys (--api-key)")
        if any(not k or k != k.strip() for k in self.api_keys) or self.admin_key == "":
            raise ValueError("API keys must be non-empty and have no surrounding spaces")
        if not self.tenant_header.strip():
            raise ValueError("the tenant header needs a name")

    def client(self, headers: Headers) -> str | None:
        """The API key a client request presented (None when none is needed); 401 without a valid one."""
        if not self.api_keys:
            return None
        given = _bearer(headers)
        found = None
        for key in self.api_keys:  # constant time, and every key compared
            if hmac.compare_digest(given, key.encode()):
                found = key
        if found is None:
            raise APIError("invalid or missing API key (Authorization: Bearer ...)", 401, "authentication_error")
        return found

    def operator(self, headers: Headers) -> None:
        """401 unless the request may read operator details (the admin key, else any API key, else anyone)."""
        if self.admin_key is None:
            self.client(headers)
        elif not hmac.compare_digest(_bearer(headers), self.admin_key.encode()):
            raise APIError("this route needs the admin key (Authorization: Bearer ...)", 401, "authentication_error")

    def cache_salt(self, headers: Headers, key: str | None, requested: str | None) -> str | None:
        """The cache salt a request runs with: its tenant's namespace, then the salt it asked for."""
        if self.cache_isolation == "none":
            return requested
        if self.cache_isolation == "api-key":
            tenant = "key\x00" + (key or "")
        else:
            name = headers.get(self.tenant_header, "").strip()
            if not name:
                raise APIError(
                    f"this server keeps tenants' prefix caches apart: send the {self.tenant_header} header",
                    param=self.tenant_header,
                )
            tenant = "tenant\x00" + name
        salted = tenant if requested is None else f"{tenant}\x00{requested}"
        return hashlib.sha256(salted.encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def tenants_apart(self) -> bool:
        return self.cache_isolation != "none"


def _bearer(headers: Headers) -> bytes:
    """The credentials of `Authorization: Bearer ...` (scheme in any case), or b"" if there are none."""
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return credentials.strip().encode("utf-8", "surrogateescape")
