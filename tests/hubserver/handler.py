"""HTTP layer of the local test Hub: routing, request/response plumbing and auth.

The endpoints themselves live in `endpoints_repos.py` (accounts, repo management, info, refs, tree) and
`endpoints_files.py` (preupload, LFS, commit, resolve); `Handler` mixes them in.
"""

from __future__ import annotations

import json
import re
import tempfile
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .endpoints_files import FileEndpoints
from .endpoints_repos import RepoEndpoints
from .storage import HubError, Repo

if TYPE_CHECKING:  # pragma: no cover
    from .server import HubServer, User

T = r"(?P<type>models|datasets|spaces)"
ID = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
PFX = r"(?:(?P<prefix>datasets|spaces)/)?"
ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + r"/?$"), h)
    for m, p, h in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/repos/move", "move_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/{T}", "list_repos"),
        ("GET", rf"/api/{T}/{ID}(?:/revision/(?P<rev>.+))?", "repo_info"),
        ("PUT", rf"/api/{T}/{ID}/settings", "settings"),
        ("POST", rf"/api/{T}/{ID}/preupload/(?P<rev>.+)", "preupload"),
        ("POST", rf"/api/{T}/{ID}/commit/(?P<rev>.+)", "commit"),
        ("GET", rf"/api/{T}/{ID}/tree/(?P<rest>.+)", "tree"),
        ("POST", rf"/api/{T}/{ID}/paths-info/(?P<rev>.+)", "paths_info"),
        ("GET", rf"/api/{T}/{ID}/refs", "refs"),
        ("GET", rf"/api/{T}/{ID}/commits/(?P<rev>.+)", "list_commits"),
        ("POST", rf"/api/{T}/{ID}/branch/(?P<ref>.+)", "create_branch"),
        ("DELETE", rf"/api/{T}/{ID}/branch/(?P<ref>.+)", "delete_branch"),
        ("POST", rf"/api/{T}/{ID}/tag/(?P<ref>.+)", "create_tag"),
        ("DELETE", rf"/api/{T}/{ID}/tag/(?P<ref>.+)", "delete_tag"),
        ("GET", rf"/api/{T}/{ID}/auth-check", "auth_check"),
        ("POST", rf"/{PFX}{ID}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/__lfs__/upload/(?P<ticket>[0-9a-f]+)", "lfs_put"),
        ("POST", r"/__lfs__/verify/(?P<ticket>[0-9a-f]+)", "lfs_verify"),
        ("GET", r"/__lfs__/download/(?P<ticket>[0-9a-f]+)", "lfs_download"),
        ("GET", rf"/{PFX}{ID}/resolve/(?P<rest>.+)", "resolve"),
        ("HEAD", rf"/{PFX}{ID}/resolve/(?P<rest>.+)", "resolve"),
    ]
]


class Handler(RepoEndpoints, FileEndpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub (every response carries Content-Length)
    server_version = "LocalTestHub/1.0"
    disable_nagle_algorithm = True  # avoid 40 ms Nagle/delayed-ACK stalls on keep-alive connections
    timeout = 300  # idle keep-alive connections are closed after this many seconds
    hub: "HubServer"  # set on the class created by HubServer

    # -- plumbing ------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # silence stderr logging
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self):
        """Whole request body (Content-Length or chunked) in a spooled temp file."""
        body = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                self._copy(size, body)
                self.rfile.readline(65537)
        else:
            self._copy(int(self.headers.get("Content-Length") or 0), body)
        body.seek(0)
        return body

    def _copy(self, n: int, out) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                raise ConnectionError("truncated body")
            out.write(chunk)
            n -= len(chunk)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.status_sent = 0
        try:
            self.body = self._read_body()
        except (ConnectionError, ValueError):
            self.close_connection = True
            return
        try:
            failure = hub._take_failure(method, self.raw_path)
            if failure is not None:
                status, message = failure
                raise HubError(status, message or f"Injected failure ({status}) for {method} {self.raw_path}")
            for route_method, regex, name in ROUTES:
                if route_method != method:
                    continue
                match = regex.match(self.raw_path)
                if match:
                    getattr(self, "h_" + name)(**{k: v for k, v in match.groupdict().items()})
                    break
            else:
                raise HubError(404, f"Not found: {method} {self.raw_path} is not served by the local test Hub")
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):  # the client went away: nothing to answer
            self.close_connection = True
        except Exception as exc:  # a server bug must surface in the test output, not as a hang
            traceback.print_exc()
            if self.status_sent:
                self.close_connection = True  # response already started: cannot send a clean error
            else:
                self._send_error(HubError(500, f"Local test Hub internal error: {exc!r}"))
        finally:
            self.body.close()
            hub._log(method, self.path, self.status_sent)

    def _json_body(self) -> Any:
        raw = self.body.read()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON")

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None, head: bool = False, length: int | None = None) -> None:
        self.status_sent = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict | None = None,
                   content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), content_type, headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("latin-1", "replace").decode("latin-1")
                   .replace("\r", " ").replace("\n", " ")}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, body, "application/json", headers, head=self.command == "HEAD")

    # -- auth / lookup helpers -----------------------------------------------------------------------------
    def _user(self) -> "User | None":
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
        user = self.hub.users.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self, action: str) -> "User":
        user = self._user()
        if user is None:
            raise HubError(401, f"You must be authenticated to {action}")
        return user

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> tuple[Repo, "User | None"]:
        user = self._user()
        repo = self.hub.state.get(repo_type, repo_id)
        if repo is None or not self.hub._can_read(user, repo):
            raise HubError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        if write:
            if user is None:
                raise HubError(401, f"You must be authenticated to write to {repo_type} {repo_id}")
            if not self.hub._can_write(user, repo.namespace):
                raise HubError(403, f"You don't have the rights to write to {repo_type} repo '{repo_id}' "
                                    f"(user '{user.name}'{'' if user.can_write else ', read-only token'})")
        return repo, user

    def _resolve(self, repo: Repo, rev: str) -> str:
        oid = repo.resolve(rev)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return oid

    def _url(self, repo: Repo, suffix: str = "") -> str:
        return f"{self.hub.url}/{repo.url_path}{suffix}"
