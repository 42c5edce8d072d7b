"""`mri serve`: the console's HTTP server (stdlib, threaded). JSON API under /api, the page and its three
static files at /, long work (steering, new graphs, graph interventions) streamed as server-sent events.

Safety: bound to 127.0.0.1 unless asked; any other address requires a token (sent as `Authorization:
Bearer TOKEN` or `?token=TOKEN`, compared in constant time); a local console answers only Host names of
localhost (no DNS rebinding) and only JSON POSTs (no cross-site form posts). Static files come from a fixed table, never
from the request path; inputs are validated before use; errors are one line, never a traceback; nothing
from a request is executed or used as a file path.
"""

from __future__ import annotations

import hmac
import json
import secrets
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aimri.console.app import Console, RequestError
from aimri.errors import AimriError

STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
          "/app.css": ("app.css", "text/css")}  # fmt: skip
MAX_BODY = 64 * 1024
LOCAL = ("127.0.0.1", "localhost", "::1")


def _static(name: str) -> bytes:
    return resources.files("aimri.console").joinpath("static", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    console: Console
    token: str | None = None
    server_version = "aimri-console"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; errors are answered to the client

    # -- plumbing ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or query.get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, max_num_fields=16)
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.token is None and host not in LOCAL:  # DNS rebinding: a local console answers local names only
            self._error(HTTPStatus.FORBIDDEN, f"this console answers requests for localhost, not {host[:60]!r}")
            return
        if method == "POST" and not (self.headers.get("Content-Type") or "").startswith("application/json"):
            # other sites' pages may POST forms here; only a same-origin script can send JSON
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the request body as application/json")
            return
        if not self._authorised(query):
            self._error(HTTPStatus.UNAUTHORIZED, "a token is required: open the URL mri serve printed")
            return
        try:
            if method == "GET" and url.path in STATIC:
                name, ctype = STATIC[url.path]
                self._send(HTTPStatus.OK, _static(name), f"{ctype}; charset=utf-8")
            elif method == "GET" and url.path == "/api/graph":
                self._send(HTTPStatus.OK, self.console.graph_bytes(query.get("name", [""])[0]), "application/json")
            elif method == "GET" and url.path.startswith("/api/"):
                self._json(HTTPStatus.OK, self._get(url.path, query))
            elif method == "POST" and url.path in ("/api/steer", "/api/intervene", "/api/trace"):
                self._stream(url.path, self._body())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page or endpoint: {url.path}")
        except RequestError as err:
            self._error(err.status, str(err))
        except AimriError as err:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(err))
        except Exception as err:  # a bug: one line to the client, the traceback to our stderr only
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(err).__name__}); see the server log")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("bad Content-Length") from None
        if not 0 < length <= MAX_BODY:
            raise RequestError(f"the request body must be 1..{MAX_BODY} bytes of JSON")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the request body is not JSON ({err.__class__.__name__})") from err
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    # -- endpoints --------------------------------------------------------------------------------
    def _get(self, path: str, query: dict[str, list[str]]) -> Any:
        def arg(name: str, default: str | None = None) -> str:
            values = query.get(name)
            if values:
                return values[0]
            if default is None:
                raise RequestError(f"missing query parameter {name!r}")
            return default

        def integer(name: str, default: str | None = None, low: int = 0, high: int = 2**62) -> int:
            text = arg(name, default)
            try:
                value = int(text)
            except ValueError:
                raise RequestError(f"{name} must be an integer, not {text[:20]!r}") from None
            if not low <= value <= high:
                raise RequestError(f"{name} must be in {low}..{high}")
            return value

        c = self.console
        if path == "/api/status":
            return c.status()
        if path == "/api/search":
            return c.search(integer("atlas", "0"), arg("q"), arg("by", "label"), integer("limit", "20", 1, 200))
        if path == "/api/feature":
            return c.feature(integer("atlas", "0"), integer("id"))
        if path == "/api/checkup":
            return c.checkup()
        raise RequestError(f"no such endpoint: {path}", 404)

    def _stream(self, path: str, body: dict[str, Any]) -> None:
        """Server-sent events: `progress` while the work runs, then one `result` or `error`."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(kind: str, data: Any) -> None:
            self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        def progress(stage: str, done: int, total: int) -> None:
            event("progress", {"stage": stage, "done": done, "total": total})

        try:
            work = {"/api/steer": self.console.steer, "/api/intervene": self.console.intervene,
                    "/api/trace": self.console.trace}[path]  # fmt: skip
            event("result", work(body, progress))
        except AimriError as err:
            event("error", {"error": str(err)})
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            event("error", {"error": f"internal error ({type(err).__name__}); see the server log"})


def make_server(console: Console, host: str = "127.0.0.1", port: int = 8765, token: str | None = None):  # type: ignore[no-untyped-def]
    """A ready server (call serve_forever); a non-local host gets a token (generated when not given)."""
    if host not in LOCAL and not token:
        token = secrets.token_urlsafe(18)
    handler = type("ConsoleHandler", (Handler,), {"console": console, "token": token})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise AimriError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from err
    server.daemon_threads = True
    return server, token
