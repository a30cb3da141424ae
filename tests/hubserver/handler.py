"""HTTP layer of the local test Hub: routing, auth, and the endpoints huggingface_hub/datasets call."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .storage import (
    REPO_TYPES,
    URL_PREFIXES,
    FileEntry,
    HubError,
    Repo,
    is_lfs_path,
    iso,
    parse_front_matter,
    safetensors_summary,
    tree_id,
    validate_path,
)

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
TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _split_rev(rest: str) -> tuple[str, str]:
    """Split `<rev>/<path>` of a raw (percent-encoded) URL tail. `refs/pr/1` may come quoted or not."""
    segs = rest.split("/")
    if segs[0] == "refs" and len(segs) >= 3:
        return "/".join(segs[:3]), unquote("/".join(segs[3:]))
    return unquote(segs[0]), unquote("/".join(segs[1:]))


class Handler(BaseHTTPRequestHandler):
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
        except Exception as exc:  # a server bug must surface in the test output, not as a hang
            traceback.print_exc()
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

    # -- account / repo management -------------------------------------------------------------------------
    def h_whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        role = "write" if user.can_write else "read"
        self._send_json({
            "type": "user", "id": f"id-{user.name}", "name": user.name, "fullname": user.name.title(),
            "email": f"{user.name}@example.com", "emailVerified": True, "isPro": False, "canPay": False,
            "avatarUrl": "", "periodEnd": None,
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": role, "id": f"id-{o}"}
                     for o in sorted(user.orgs)],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": f"{user.name}-{role}", "role": role,
                                     "createdAt": "2024-01-01T00:00:00.000Z"}},
        })

    def h_agent_harnesses(self) -> None:
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def h_create_repo(self) -> None:
        payload = self._json_body()
        user = self._require_user("create a repo")
        name, org = payload.get("name"), payload.get("organization")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        if not isinstance(name, str) or not name:
            raise HubError(400, "Missing repo name")
        ns = org or user.name
        repo_id = f"{ns}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not self.hub._can_write(user, ns):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                f"\"{ns}\" (user '{user.name}'{'' if user.can_write else ', read-only token'})")
        visibility = payload.get("visibility")
        private = visibility in ("private", "protected") if visibility else bool(payload.get("private"))
        try:
            self.hub.state.create_repo(repo_type, repo_id, private=private, author=user.name,
                                       gitattributes=self.hub.initial_gitattributes)
        except HubError as err:
            if err.status == 409:
                err.extra = {"url": url}
            raise
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def h_delete_repo(self) -> None:
        payload = self._json_body()
        user = self._require_user("delete a repo")
        repo_type = payload.get("type") or "model"
        ns = payload.get("organization") or user.name
        repo, _ = self._repo(repo_type, f"{ns}/{payload.get('name')}", write=True)
        self.hub.state.delete_repo(repo)
        self._send_json({})

    def h_move_repo(self) -> None:
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        repo, user = self._repo(repo_type, str(payload.get("fromRepo")), write=True)
        to_id = str(payload.get("toRepo"))
        if not self.hub._can_write(user, to_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to move a repo to '{to_id}'")
        state = self.hub.state
        with state.lock:
            if state.get(repo_type, to_id) is not None:
                raise HubError(409, f"Repo {to_id} already exists")
            state.delete_repo(repo)
            repo.repo_id = to_id
            state.repos[(repo_type, to_id)] = repo
            state.persist(repo)
        self._send_json({})

    def h_settings(self, type: str, ns: str, name: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        payload = self._json_body()
        with self.hub.state.lock:
            if "visibility" in payload:
                repo.private = payload["visibility"] in ("private", "protected")
            if "private" in payload:
                repo.private = bool(payload["private"])
            if "gated" in payload:
                repo.gated = payload["gated"]
            self.hub.state.persist(repo)
        self._send_json({})

    def h_validate_yaml(self) -> None:
        payload = self._json_body()
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, "Missing 'content'")
        _, error = parse_front_matter(content)
        if error is not None:
            raise HubError(400, error, extra={"errors": [{"message": error}]})
        self._send_json({"warnings": []})

    # -- repo info -----------------------------------------------------------------------------------------
    def _repo_info_dict(self, repo: Repo, oid: str) -> dict:
        state = self.hub.state
        commit = repo.commits[oid]
        card, config = None, None
        readme = commit.files.get("README.md")
        if readme is not None and not readme.lfs:
            card, _ = parse_front_matter(state.blobs.read(readme.sha256).decode("utf-8", "replace"))
        siblings = []
        for path in sorted(commit.files):
            e = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path, "size": e.size, "blobId": e.blob_id}
            if e.lfs:
                sib["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(e.pointer)}
            siblings.append(sib)
        tags = list((card or {}).get("tags") or []) if isinstance((card or {}).get("tags"), list) else []
        info: dict[str, Any] = {
            "_id": f"id-{repo.repo_id}", "id": repo.repo_id, "author": repo.namespace, "sha": oid,
            "lastModified": iso(commit.date), "createdAt": iso(repo.created_at), "private": repo.private,
            "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
            "siblings": siblings, "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
            if isinstance(card.get("license"), str):
                tags.append(f"license:{card['license']}")
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            if card:
                info["library_name"] = card.get("library_name")
                info["pipeline_tag"] = card.get("pipeline_tag")
                if card.get("library_name") and card["library_name"] not in tags:
                    tags.insert(0, card["library_name"])
            cfg = commit.files.get("config.json")
            if cfg is not None and not cfg.lfs:
                try:
                    raw = json.loads(state.blobs.read(cfg.sha256))
                    config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
                except ValueError:
                    pass
            if config is not None:
                info["config"] = config
            params: dict[str, int] = {}
            for path, e in commit.files.items():
                if path.endswith(".safetensors"):
                    with open(state.blobs.path(e.sha256), "rb") as f:
                        head = f.read(8)
                        n = int.from_bytes(head, "little") if len(head) == 8 else 0
                        head += f.read(n) if 2 <= n <= min(e.size - 8, 100 << 20) else b""
                    summary = safetensors_summary(head)
                    if summary:
                        for dtype, n in summary["parameters"].items():
                            params[dtype] = params.get(dtype, 0) + n
            if params:
                info["safetensors"] = {"parameters": params, "total": sum(params.values())}
        elif repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk")
        return info

    def h_repo_info(self, type: str, ns: str, name: str, rev: str | None = None) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        oid = self._resolve(repo, unquote(rev) if rev else "main")
        self._send_json(self._repo_info_dict(repo, oid))

    def h_list_repos(self, type: str) -> None:
        user = self._user()
        author = (self.query.get("author") or [None])[0]
        search = (self.query.get("search") or [None])[0]
        out = []
        with self.hub.state.lock:
            repos = [r for r in self.hub.state.repos.values() if r.repo_type == TYPE_FROM_PLURAL[type]]
        for repo in sorted(repos, key=lambda r: r.repo_id):
            if not self.hub._can_read(user, repo):
                continue
            if author and repo.namespace != author:
                continue
            if search and search.lower() not in repo.repo_id.lower():
                continue
            info = self._repo_info_dict(repo, repo.branches["main"])
            info.pop("siblings", None)
            out.append(info)
        self._send_json(out)

    def h_auth_check(self, type: str, ns: str, name: str) -> None:
        self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        self._send_json({})

    # -- refs / history ------------------------------------------------------------------------------------
    def h_refs(self, type: str, ns: str, name: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        out: dict[str, Any] = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()],
        }
        if _truthy((self.query.get("include_prs") or [None])[0]):
            out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                                   for n, o in sorted(repo.prs.items())]
        self._send_json(out)

    def h_list_commits(self, type: str, ns: str, name: str, rev: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        oid = self._resolve(repo, _split_rev(rev)[0])
        self._send_json([
            {"id": c.oid, "title": c.title, "message": c.message, "authors": [{"user": c.author, "avatar": ""}],
             "date": iso(c.date), "parents": [c.parent] if c.parent else [],
             "formatted": {"title": c.title, "message": c.message}}
            for c in repo.history(oid)
        ])

    def h_create_branch(self, type: str, ns: str, name: str, ref: str) -> None:
        repo, user = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        branch = unquote(ref)
        if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or ".." in branch:
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        start = self._json_body().get("startingPoint")
        with self.hub.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._resolve(repo, start or "main")
            self.hub.state.persist(repo)
        self._send_json({})

    def h_delete_branch(self, type: str, ns: str, name: str, ref: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        branch = unquote(ref)
        with self.hub.state.lock:
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch 'main'")
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.branches[branch]
            self.hub.state.persist(repo)
        self._send_json({})

    def h_create_tag(self, type: str, ns: str, name: str, ref: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9._/-]+", tag):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        with self.hub.state.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve(repo, unquote(ref))
            self.hub.state.persist(repo)
        self._send_json({})

    def h_delete_tag(self, type: str, ns: str, name: str, ref: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        with self.hub.state.lock:
            if repo.tags.pop(unquote(ref), None) is None:
                raise HubError(404, f"Invalid rev id: {unquote(ref)}", code="RevisionNotFound")
            self.hub.state.persist(repo)
        self._send_json({})

    # -- tree / paths-info ---------------------------------------------------------------------------------
    def _entry_json(self, repo: Repo, oid: str, path: str, expand: bool, is_dir: bool) -> dict:
        files = repo.commits[oid].files
        if is_dir:
            out: dict[str, Any] = {"type": "directory", "oid": tree_id(files, path), "size": 0, "path": path}
        else:
            e = files[path]
            out = {"type": "file", "oid": e.blob_id, "size": e.size, "path": path}
            if e.lfs:
                out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(e.pointer)}
        if expand:
            c = self.hub.state.last_commit_touching(repo, oid, path, is_dir)
            out["lastCommit"] = {"id": c.oid, "title": c.title, "date": iso(c.date)}
        return out

    @staticmethod
    def _dirs(files) -> set[str]:
        dirs = set()
        for p in files:
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
        return dirs

    def h_tree(self, type: str, ns: str, name: str, rest: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        rev, path = _split_rev(rest)
        path = path.strip("/")
        oid = self._resolve(repo, rev)
        recursive = _truthy((self.query.get("recursive") or [None])[0])
        expand = _truthy((self.query.get("expand") or [None])[0])
        files = repo.commits[oid].files
        dirs = self._dirs(files)
        if path and path not in dirs:
            raise HubError(404, f"Entry not found: {path} is not a folder at {rev}", code="EntryNotFound",
                           headers={"X-Repo-Commit": oid})
        prefix = path + "/" if path else ""
        entries = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                entries.append(self._entry_json(repo, oid, d, expand, True))
        for p in sorted(files):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                entries.append(self._entry_json(repo, oid, p, expand, False))
        self._send_json(entries, headers={"X-Repo-Commit": oid})

    def h_paths_info(self, type: str, ns: str, name: str, rev: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        oid = self._resolve(repo, _split_rev(rev)[0])
        raw = self.body.read()
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            payload = json.loads(raw or b"{}")
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
            paths = [paths] if isinstance(paths, str) else paths
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = _truthy((form.get("expand") or [None])[0])
        files = repo.commits[oid].files
        dirs = self._dirs(files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._entry_json(repo, oid, p, expand, False))
            elif p in dirs:
                out.append(self._entry_json(repo, oid, p, expand, True))
        self._send_json(out, headers={"X-Repo-Commit": oid})

    # -- upload: preupload, LFS, commit --------------------------------------------------------------------
    def h_preupload(self, type: str, ns: str, name: str, rev: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        revision = _split_rev(rev)[0]
        oid = self._resolve(repo, revision)
        files = repo.commits[oid].files
        payload = self._json_body()
        gitattributes = None
        if ".gitattributes" in files:
            gitattributes = self.hub.state.blobs.read(files[".gitattributes"].sha256).decode("utf-8", "replace")
        out = []
        for f in payload.get("files") or []:
            path = validate_path(f.get("path"))
            try:
                sample = base64.b64decode(f.get("sample") or "")
            except (binascii.Error, ValueError):
                raise HubError(400, f"Invalid base64 sample for {path}")
            lfs = is_lfs_path(path, gitattributes, int(f.get("size") or 0), sample)
            existing = files.get(path)
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.blob_id)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": remote_oid})
        self._send_json({"files": out, "commitOid": oid})

    def h_lfs_batch(self, ns: str, name: str, prefix: str | None = None) -> None:
        repo_type = {"datasets": "dataset", "spaces": "space", None: "model"}[prefix]
        payload = self._json_body()
        operation = payload.get("operation")
        repo, _ = self._repo(repo_type, f"{ns}/{name}", write=operation == "upload")
        if operation not in ("upload", "download"):
            raise HubError(400, f"Unsupported LFS operation: {operation!r}")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            present = oid in repo.lfs_objects and self.hub.state.blobs.has(oid)
            if operation == "download":
                if not present:
                    objects.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object not found"}})
                else:
                    ticket = self.hub._new_ticket(repo, oid, size)
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                        "download": {"href": f"{self.hub.url}/__lfs__/download/{ticket}"}}})
            elif present:
                objects.append({"oid": oid, "size": size})  # nothing to upload
            else:
                ticket = self.hub._new_ticket(repo, oid, size)
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.hub.url}/__lfs__/upload/{ticket}"},
                    "verify": {"href": f"{self.hub.url}/__lfs__/verify/{ticket}", "header": {}},
                }})
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def h_lfs_put(self, ticket: str) -> None:
        info = self.hub._tickets.get(ticket)
        if info is None:
            raise HubError(404, "Unknown or expired upload URL")
        repo_key, oid, size = info
        store = self.hub.state.blobs
        sha, got_size, tmp = store.put_stream(self.body)
        if sha != oid or got_size != size:
            store.discard_tmp(tmp)
            raise HubError(400, f"Uploaded content does not match the announced object: expected sha256={oid} "
                                f"size={size}, got sha256={sha} size={got_size}")
        store.commit_tmp(tmp, sha)
        with self.hub.state.lock:
            repo = self.hub.state.repos.get(repo_key)
            if repo is not None:
                repo.lfs_objects.add(oid)
        self._send(200, b"", "text/plain", {"ETag": f'"{oid}"'})

    def h_lfs_verify(self, ticket: str) -> None:
        info = self.hub._tickets.get(ticket)
        payload = self._json_body()
        if info is None:
            raise HubError(404, "Unknown or expired verify URL")
        repo = self.hub.state.repos.get(info[0])
        oid = payload.get("oid", info[1])
        if repo is None or oid not in repo.lfs_objects or not self.hub.state.blobs.has(oid):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        self._send_json({})

    def h_lfs_download(self, ticket: str) -> None:
        info = self.hub._tickets.get(ticket)
        if info is None:
            raise HubError(404, "Unknown or expired download URL")
        self._send(200, self.hub.state.blobs.read(info[1]), "application/octet-stream")

    def h_commit(self, type: str, ns: str, name: str, rev: str) -> None:
        repo_type = TYPE_FROM_PLURAL[type]
        repo, user = self._repo(repo_type, f"{ns}/{name}", write=True)
        revision = _split_rev(rev)[0]
        create_pr = _truthy((self.query.get("create_pr") or [None])[0])
        header: dict | None = None
        ops: list[tuple] = []
        store = self.hub.state.blobs
        for n, line in enumerate(self.body.read().splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"Malformed NDJSON commit payload at line {n + 1}")
            if key == "header":
                header = value
            elif key == "file":
                path = validate_path(value.get("path"))
                content = value.get("content", "")
                if value.get("encoding", "utf-8") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except (binascii.Error, ValueError):
                        raise HubError(400, f"Invalid base64 content for {path}")
                else:
                    data = content.encode()
                ops.append(("add", path, FileEntry.regular(data, store.put_bytes(data))))
            elif key == "lfsFile":
                path = validate_path(value.get("path"))
                oid = value.get("oid")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_objects or not store.has(oid):
                    raise HubError(422, f"LFS object {oid} for '{path}' was not uploaded to {repo.repo_id}: "
                                        "upload it through the LFS batch API before committing")
                size = value.get("size")
                real_size = os.path.getsize(store.path(oid))
                if size is not None and size != real_size:
                    raise HubError(422, f"LFS object {oid} for '{path}' has size {real_size}, not {size}")
                ops.append(("add", path, FileEntry.lfs_file(oid, real_size)))
            elif key == "deletedFile":
                ops.append(("delete_file", validate_path(value.get("path"))))
            elif key == "deletedFolder":
                ops.append(("delete_folder", str(value.get("path") or "").strip("/")))
            else:
                raise HubError(400, f"Unsupported commit operation key: {key!r}")
        if header is None or not str(header.get("summary") or "").strip():
            raise HubError(400, "Commit summary is required (header.summary)")
        commit, pr_num = self.hub.state.apply_commit(
            repo, revision, ops, title=str(header["summary"]).strip(), message=str(header.get("description") or ""),
            author=user.name, parent_commit=header.get("parentCommit"), create_pr=create_pr,
        )
        out = {"success": True, "commitOid": commit.oid, "commitUrl": self._url(repo, f"/commit/{commit.oid}"),
               "hookOutput": ""}
        if pr_num is not None:
            out["pullRequestUrl"] = self._url(repo, f"/discussions/{pr_num}")
        self._send_json(out)

    # -- downloads -----------------------------------------------------------------------------------------
    def h_resolve(self, ns: str, name: str, rest: str, prefix: str | None = None) -> None:
        repo_type = {"datasets": "dataset", "spaces": "space", None: "model"}[prefix]
        repo, _ = self._repo(repo_type, f"{ns}/{name}")
        rev, path = _split_rev(rest)
        oid = self._resolve(repo, rev)
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", code="EntryNotFound",
                           headers={"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry.lfs:
            headers.update({"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"',
                            "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, f"Invalid range: {range_header}", headers={"Content-Range": f"bytes */{entry.size}"})
            if m.group(1) == "":
                start = max(entry.size - int(m.group(2)), 0)
            else:
                start = int(m.group(1))
                if m.group(2) != "":
                    end = min(int(m.group(2)), entry.size - 1)
            if start >= entry.size or start > end:
                if not (entry.size == 0 and start == 0):
                    raise HubError(416, f"Range not satisfiable: {range_header}",
                                   headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        head = self.command == "HEAD"
        ctype = "text/plain; charset=utf-8" if not entry.lfs else "application/octet-stream"
        if head:
            self._send(status, b"", ctype, headers, head=True, length=length)
            return
        with open(self.hub.state.blobs.path(entry.sha256), "rb") as f:
            f.seek(start)
            data = f.read(length)
        self._send(status, data, ctype, headers)
