"""Security headers on every answer: no MIME sniffing, a Content-Security-Policy that allows scripts only
from this server and htmx's configured source, a referrer policy, and no framing except the embed view.

Token strings and prompts are escaped by the templates; the policy is the second line of defence: even
an injected <script> or inline handler would not run. Styles allow 'unsafe-inline' because the pages set
per-token colours with style="--a:..." and htmx injects its indicator style.

A route that needs another policy (the embed view) sets its own Content-Security-Policy header; this
middleware only adds headers a response does not already have.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from featurescope.app.settings import Settings

REFERRER_POLICY = "strict-origin-when-cross-origin"  # shared links keep their path inside the site only
# Swagger UI at /-/docs loads its script and style from jsDelivr and starts itself with an inline script.
DOCS_SOURCES = "https://cdn.jsdelivr.net"


def script_sources(settings: Settings) -> str:
    """'self', plus the origin of the htmx URL when pages load htmx from elsewhere (its CDN by default)."""
    if settings.local_htmx is not None:
        return "'self'"
    parts = urlsplit(settings.htmx_url)
    return f"'self' {parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "'self'"


def content_security_policy(settings: Settings, frame_ancestors: str = "'none'") -> str:
    return ("default-src 'self'; "
            f"script-src {script_sources(settings)}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'self'; form-action 'self'; "
            f"frame-ancestors {frame_ancestors}")


def embed_policy(settings: Settings) -> str:
    """The embed view (?embed=1) is made to be framed by any site."""
    return content_security_policy(settings, frame_ancestors="*")


def _docs_policy() -> str:
    return (f"default-src 'self'; script-src 'self' 'unsafe-inline' {DOCS_SOURCES}; "
            f"style-src 'self' 'unsafe-inline' {DOCS_SOURCES}; img-src 'self' data: https://fastapi.tiangolo.com; "
            "object-src 'none'; base-uri 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    """A pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a queue per request)."""

    def __init__(self, app: ASGIApp, settings: Settings, docs_path: str) -> None:
        self.app, self.docs_path = app, docs_path
        self.headers = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", REFERRER_POLICY.encode())]
        self.policy = content_security_policy(settings).encode()
        self.docs = _docs_policy().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.docs if scope["path"] == self.docs_path else self.policy

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", policy))
                    headers.append((b"x-frame-options", b"DENY"))  # for browsers older than frame-ancestors
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
