"""`HubServer`: a local, stdlib-only, Hugging Face Hub-compatible HTTP server for tests."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from .handler import Handler
from .storage import REPO_TYPES, FileEntry, HubError, HubState, Repo, is_lfs_path, iso

WRITE_USER = "tester"
READ_USER = "reader"
OTHER_USER = "other"
ORG = "test-org"
WRITE_TOKEN = "hf_test_write_token"  # user `tester`, may write `tester/*` and `test-org/*`
READ_TOKEN = "hf_test_read_token"  # user `reader`, read-only token
OTHER_WRITE_TOKEN = "hf_test_other_write_token"  # user `other`, may write `other/*` only

# Regexes of request paths, for `fail_next`
LFS_UPLOAD_PATH = r"^/__lfs__/upload/"  # the PUT of an LFS object's content
LFS_BATCH_PATH = r"\.git/info/lfs/objects/batch$"
COMMIT_PATH = r"^/api/(models|datasets|spaces)/[^/]+/[^/]+/commit/"
PREUPLOAD_PATH = r"^/api/(models|datasets|spaces)/[^/]+/[^/]+/preupload/"
RESOLVE_PATH = r"/resolve/"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # client hang-ups are normal
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class User:
    name: str
    orgs: frozenset = frozenset()
    can_write: bool = True


class HubServer:
    """A Hub-compatible server on 127.0.0.1 (a free port by default), serving from a temp dir.

    >>> server = HubServer().start()
    >>> server.url  # use as HF_ENDPOINT
    'http://127.0.0.1:PORT'
    """

    def __init__(self, root: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 initial_gitattributes: bool = True):
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="local-hf-hub-")
        self.host, self._port = host, port
        self.initial_gitattributes = initial_gitattributes
        self.state = HubState(self.root)
        self.users: dict[str, User] = {}
        self._failures: list[dict] = []
        self._fail_lock = threading.Lock()
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path with query, status), in order
        self._httpd: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.add_user(WRITE_TOKEN, WRITE_USER, orgs=(ORG,), can_write=True)
        self.add_user(READ_TOKEN, READ_USER, can_write=False)
        self.add_user(OTHER_WRITE_TOKEN, OTHER_USER, can_write=True)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        handler = type("BoundHubHandler", (Handler,), {"hub": self})
        httpd = _QuietServer((self.host, self._port), handler)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="local-hf-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint, e.g. `http://127.0.0.1:43123` (what HF_ENDPOINT must be)."""
        return f"http://{self.host}:{self.port}"

    endpoint = url

    def reset(self) -> None:
        """Forget every repo, injected failure, upload URL and logged request (users are kept)."""
        with self.state.lock:
            self.state.repos.clear()
            for t in REPO_TYPES:
                shutil.rmtree(os.path.join(self.root, t + "s"), ignore_errors=True)
            # no repo references any blob any more (LFS objects are tracked per repo)
            shutil.rmtree(self.state.blobs.root, ignore_errors=True)
            os.makedirs(self.state.blobs.root, exist_ok=True)
        with self._fail_lock:
            self._failures.clear()
        self._tickets.clear()
        self.requests.clear()

    # -- users / permissions -------------------------------------------------------------------------------
    def add_user(self, token: str, name: str, orgs=(), can_write: bool = True) -> None:
        self.users[token] = User(name, frozenset(orgs), can_write)

    @staticmethod
    def _can_read(user: User | None, repo: Repo) -> bool:
        return not repo.private or (user is not None and (repo.namespace == user.name or repo.namespace in user.orgs))

    @staticmethod
    def _can_write(user: User | None, namespace: str) -> bool:
        return user is not None and user.can_write and (namespace == user.name or namespace in user.orgs)

    # -- fault injection / request log ---------------------------------------------------------------------
    def fail_next(self, path_regex: str, status: int = 500, times: int = 1, method: str | None = None,
                  message: str | None = None) -> None:
        """Make the next `times` requests whose URL path matches `path_regex` (re.search) fail with `status`.

        The request body is read and discarded; nothing is applied. NOTE: huggingface_hub retries 408/429/5xx
        (up to 5 retries, 1+2+4+8+8 s of sleep) on most calls (LFS PUT, preupload, LFS batch, HEAD/GET of files,
        tree listings); the commit POST is not retried. Use a 4xx status (e.g. 403) or `times>=6` to make a
        retried call fail for good. See LFS_UPLOAD_PATH / COMMIT_PATH / PREUPLOAD_PATH / LFS_BATCH_PATH.
        """
        with self._fail_lock:
            self._failures.append({"regex": re.compile(path_regex), "status": status, "left": times,
                                   "method": method.upper() if method else None, "message": message})

    def clear_failures(self) -> None:
        with self._fail_lock:
            self._failures.clear()

    @property
    def pending_failures(self) -> int:
        with self._fail_lock:
            return sum(f["left"] for f in self._failures)

    def _take_failure(self, method: str, path: str) -> tuple[int, str | None] | None:
        with self._fail_lock:
            for f in self._failures:
                if f["left"] > 0 and (f["method"] in (None, method)) and f["regex"].search(path):
                    f["left"] -= 1
                    if f["left"] == 0:
                        self._failures.remove(f)
                    return f["status"], f["message"]
        return None

    def _log(self, method: str, path: str, status: int) -> None:
        self.requests.append((method, path, status))

    def _new_ticket(self, repo: Repo, oid: str, size: int) -> str:
        ticket = secrets.token_hex(16)
        self._tickets[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
        return ticket

    # -- introspection -------------------------------------------------------------------------------------
    def _get(self, repo_id: str, repo_type: str) -> Repo:
        repo = self.state.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on the local hub")
        return repo

    def _commit(self, repo_id: str, repo_type: str, revision: str):
        repo = self._get(repo_id, repo_type)
        oid = repo.resolve(revision)
        if oid is None:
            raise KeyError(f"No revision {revision!r} in {repo_type} repo {repo_id!r}")
        return repo, repo.commits[oid]

    def new_repo_id(self, name: str = "repo", namespace: str = WRITE_USER) -> str:
        """A repo id never used before in this session, e.g. `tester/repo-7`."""
        return f"{namespace}/{name}-{next(self._ids)}"

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return self.state.get(repo_type, repo_id) is not None

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self._get(repo_id, repo_type).private

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        """Commit sha that `revision` points to."""
        return self._commit(repo_id, repo_type, revision)[1].oid

    def list_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """{path: content} of every file at `revision` (includes `.gitattributes`)."""
        _, commit = self._commit(repo_id, repo_type, revision)
        return {p: self.state.blobs.read(e.sha256) for p, e in sorted(commit.files.items())}

    def file_entries(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, dict]:
        """{path: {"size", "lfs", "sha256", "blob_id"}} at `revision` (tells which files went through LFS)."""
        _, commit = self._commit(repo_id, repo_type, revision)
        return {p: {"size": e.size, "lfs": e.lfs, "sha256": e.sha256, "blob_id": e.blob_id}
                for p, e in sorted(commit.files.items())}

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict]:
        """History of `revision`, newest first: dicts with oid, parent, title, message, author, date, files."""
        repo, commit = self._commit(repo_id, repo_type, revision)
        return [{"oid": c.oid, "parent": c.parent, "title": c.title, "message": c.message, "author": c.author,
                 "date": iso(c.date), "files": sorted(c.files)} for c in repo.history(commit.oid)]

    def refs(self, repo_id: str, repo_type: str = "model") -> dict:
        repo = self._get(repo_id, repo_type)
        return {"branches": dict(repo.branches), "tags": dict(repo.tags),
                "pull_requests": {f"refs/pr/{n}": o for n, o in repo.prs.items()}}

    # -- seeding without HTTP ------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    exist_ok: bool = False) -> str:
        try:
            self.state.create_repo(repo_type, repo_id, private, author=repo_id.split("/")[0],
                                   gitattributes=self.initial_gitattributes)
        except HubError as err:
            if not (exist_ok and err.status == 409):
                raise
        return repo_id

    def upload_files(self, repo_id: str, files: dict, repo_type: str = "model", revision: str = "main",
                     message: str = "Seed files", delete: tuple = (), author: str | None = None,
                     create: bool = True, private: bool = False) -> str:
        """Commit `files` ({path: bytes | str}) straight into a repo (created if needed); return the commit sha.

        LFS vs regular storage follows the same rules as the HTTP preupload endpoint.
        """
        if create:
            self.create_repo(repo_id, repo_type, private=private, exist_ok=True)
        repo = self._get(repo_id, repo_type)
        ops: list[tuple] = []
        for path, data in files.items():
            data = data.encode() if isinstance(data, str) else bytes(data)
            sha = self.state.blobs.put_bytes(data)
            if is_lfs_path(path, None, len(data), data[:512]) and data:
                with self.state.lock:
                    repo.lfs_objects.add(sha)
                ops.append(("add", path, FileEntry.lfs_file(sha, len(data))))
            else:
                ops.append(("add", path, FileEntry.regular(data, sha)))
        ops.extend(("delete_file", p) for p in delete)
        commit, _ = self.state.apply_commit(repo, revision, ops, message, "", author or repo.namespace)
        return commit.oid
