"""Storage and git-like data model of the local test Hub.

File contents live on disk in a content-addressed blob store (``<root>/blobs/<sha256>``); the repo metadata
(refs, commits, file snapshots) lives in memory, guarded by one lock, and is mirrored to
``<root>/<type>s/<namespace>/<name>/repo.json`` after every change so a failing test can be inspected.

Each repo has a linear history per branch. A commit stores a full snapshot ``{path: FileEntry}``, which is
cheap at test scale and makes every revision trivially readable.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Same spirit as the Hub's default `.gitattributes`: these paths always go through LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
        # images / audio: the Hub adds these to dataset repos; harmless for models
        "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.mp3", "*.wav", "*.flac",
    )
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files above this size are always LFS on the Hub
REGEX_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(Exception):
    """An error the HTTP layer turns into a response: status, message, optional `X-Error-Code`."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}
        self.headers = headers or {}


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso(ts: _dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def parse_front_matter(text: str) -> tuple[dict | None, str | None]:
    """Return (metadata, error) of a README: (None, None) without YAML block, (None, msg) when invalid."""
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return None, None
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency of huggingface_hub's card utilities
        return {}, None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return None, f"Invalid YAML in README.md metadata: {exc}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, f"README.md metadata must be a YAML mapping, got {type(data).__name__}"
    return data, None


def validate_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git blob id: of the LFS pointer file for LFS files, of the content otherwise

    @classmethod
    def regular(cls, data: bytes, sha256: str | None = None) -> "FileEntry":
        return cls(sha256 or hashlib.sha256(data).hexdigest(), len(data), False, git_blob_sha1(data))

    @classmethod
    def lfs_file(cls, sha256: str, size: int) -> "FileEntry":
        return cls(sha256, size, True, git_blob_sha1(lfs_pointer(sha256, size)))

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: _dt.datetime
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: _dt.datetime
    gated: bool | str = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)  # refs/pr/<n> -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # sha256 of LFS objects uploaded to this repo

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str | None) -> str | None:
        """Commit oid of a branch, tag, `refs/pr/N`, `refs/heads/x`, full sha or unique sha prefix (>= 7)."""
        rev = revision or "main"
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        elif rev.startswith("refs/tags/"):
            return self.tags.get(rev[len("refs/tags/"):])
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m:
            return self.prs.get(int(m.group(1)))
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [oid for oid in list(self.commits) if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def history(self, oid: str) -> list[Commit]:
        """Commits reachable from `oid`, newest first."""
        out = []
        cur: str | None = oid
        while cur is not None:
            commit = self.commits[cur]
            out.append(commit)
            cur = commit.parent
        return out

    def to_json(self) -> dict:
        return {
            "type": self.repo_type,
            "id": self.repo_id,
            "private": self.private,
            "createdAt": iso(self.created_at),
            "branches": self.branches,
            "tags": self.tags,
            "pullRequests": {str(k): v for k, v in self.prs.items()},
            "commits": [
                {
                    "oid": c.oid, "parent": c.parent, "title": c.title, "message": c.message,
                    "author": c.author, "date": iso(c.date),
                    "files": {p: {"sha256": e.sha256, "size": e.size, "lfs": e.lfs} for p, e in c.files.items()},
                }
                for c in self.commits.values()
            ],
        }


class BlobStore:
    """Content-addressed storage of file contents, keyed by sha256."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)

    def path(self, sha256: str) -> str:
        return os.path.join(self.root, sha256)

    def has(self, sha256: str) -> bool:
        return os.path.exists(self.path(sha256))

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(sha))
        return sha

    def put_stream(self, stream: BinaryIO, chunk_size: int = 1 << 20) -> tuple[str, int, str]:
        """Store a stream; return (sha256, size, tmp_path). The caller must `commit_tmp` or `discard_tmp`."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as f:
            while True:
                chunk = stream.read(chunk_size)
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
        return h.hexdigest(), size, tmp

    def commit_tmp(self, tmp: str, sha256: str) -> None:
        os.replace(tmp, self.path(sha256))

    @staticmethod
    def discard_tmp(tmp: str) -> None:
        try:
            os.remove(tmp)
        except OSError:
            pass

    def read(self, sha256: str) -> bytes:
        with open(self.path(sha256), "rb") as f:
            return f.read()


def is_lfs_path(path: str, gitattributes: str | None, size: int, sample: bytes) -> bool:
    """Upload mode decision, close to the Hub's: `.gitattributes` LFS patterns, large files, binary files."""
    if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample:
        return True
    patterns = []
    for line in (gitattributes if gitattributes is not None else DEFAULT_GITATTRIBUTES).splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    base = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatch(path, pattern.replace("**/", "*")):
                return True
        elif fnmatch.fnmatch(base, pattern):
            return True
    return False


def safetensors_summary(data_head: bytes) -> dict | None:
    """Parameter count per dtype from a safetensors header (what the Hub exposes as `safetensors`)."""
    try:
        (n,) = struct.unpack("<Q", data_head[:8])
        header = json.loads(data_head[8 : 8 + n])
    except Exception:
        return None
    params: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        count = 1
        for dim in info.get("shape", []):
            count *= int(dim)
        params[info.get("dtype", "?")] = params.get(info.get("dtype", "?"), 0) + count
    return {"parameters": params, "total": sum(params.values())}


class HubState:
    """All repos of the server. Every mutation happens under `self.lock` and is atomic."""

    def __init__(self, root: str):
        self.root = root
        self.blobs = BlobStore(os.path.join(root, "blobs"))
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._salt = uuid.uuid4().hex  # commit oids never repeat within a session, even across reset()
        self._seq = 0

    # -- repos ---------------------------------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str,
                    gitattributes: bool = True) -> Repo:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        ns, _, name = repo_id.partition("/")
        if not ns or not REPO_NAME_RE.match(name) or name.endswith(".git") or "/" in name:
            raise HubError(400, f"Invalid repo name: {repo_id!r}")
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", code="RepoExists")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now())
            files = {}
            if gitattributes:
                data = DEFAULT_GITATTRIBUTES.encode()
                files[".gitattributes"] = FileEntry.regular(data, self.blobs.put_bytes(data))
            commit = self._new_commit(None, "initial commit", "", author, files)
            repo.commits[commit.oid] = commit
            repo.branches["main"] = commit.oid
            self.repos[(repo_type, repo_id)] = repo
            self.persist(repo)
            return repo

    def delete_repo(self, repo: Repo) -> None:
        with self.lock:
            self.repos.pop((repo.repo_type, repo.repo_id), None)
            try:
                os.remove(self._repo_json(repo))
            except OSError:
                pass

    def _repo_json(self, repo: Repo) -> str:
        return os.path.join(self.root, repo.repo_type + "s", repo.repo_id, "repo.json")

    def persist(self, repo: Repo) -> None:
        path = self._repo_json(repo)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(repo.to_json(), f, indent=1)
        os.replace(tmp, path)

    # -- commits -------------------------------------------------------------------------------------------
    def _new_commit(self, parent: str | None, title: str, message: str, author: str,
                    files: dict[str, FileEntry]) -> Commit:
        self._seq += 1
        h = hashlib.sha1()
        h.update(f"{parent}\n{title}\n{message}\n{author}\n{self._salt}\n{self._seq}\n".encode())
        for path in sorted(files):
            e = files[path]
            h.update(f"{path}\0{e.sha256}\0{e.size}\0{int(e.lfs)}\n".encode())
        return Commit(oid=h.hexdigest(), parent=parent, title=title, message=message, author=author,
                      date=now(), files=files)

    def apply_commit(self, repo: Repo, revision: str, operations: Iterable[tuple], title: str, message: str,
                     author: str, parent_commit: str | None = None, create_pr: bool = False
                     ) -> tuple[Commit, int | None]:
        """Apply operations atomically: either the new commit is created and the ref moved, or nothing changes.

        Operations: ("add", path, FileEntry), ("delete_file", path), ("delete_folder", path).
        """
        operations = list(operations)
        with self.lock:
            if (repo.repo_type, repo.repo_id) not in self.repos:
                raise HubError(404, "Repository not found", code="RepoNotFound")
            branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
            pr_match = re.fullmatch(r"refs/pr/(\d+)", revision)
            if create_pr:
                base = repo.resolve(parent_commit) if parent_commit else repo.resolve(revision)
                if base is None:
                    raise HubError(404, f"Invalid rev id: {parent_commit or revision}", code="RevisionNotFound")
            elif pr_match:
                base = repo.prs.get(int(pr_match.group(1)))
                if base is None:
                    raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            else:
                if branch not in repo.branches:
                    if repo.resolve(revision) is not None:
                        raise HubError(400, f"Cannot commit to '{revision}': not a branch")
                    raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
                base = repo.branches[branch]
            if parent_commit and not create_pr:
                parent_oid = repo.resolve(parent_commit)
                if parent_oid != base:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")

            files = dict(repo.commits[base].files)
            for op in operations:
                kind, path = op[0], op[1]
                if kind == "add":
                    for prefix in _parents(path):
                        if prefix in files:
                            raise HubError(400, f"Cannot add '{path}': '{prefix}' is a file")
                    if any(p.startswith(path + "/") for p in files):
                        raise HubError(400, f"Cannot add '{path}': a folder with this name exists")
                    files[path] = op[2]
                elif kind == "delete_file":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del files[path]
                elif kind == "delete_folder":
                    prefix = path.strip("/") + "/"
                    hits = [p for p in files if p.startswith(prefix) or prefix == "/"]
                    if not hits:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}",
                                       code="EntryNotFound")
                    for p in hits:
                        del files[p]
                else:  # pragma: no cover - guarded by the parser
                    raise HubError(400, f"Unknown operation {kind!r}")

            commit = self._new_commit(base, title, message, author, files)
            repo.commits[commit.oid] = commit
            pr_num = None
            if create_pr:
                pr_num = max(repo.prs, default=0) + 1
                repo.prs[pr_num] = commit.oid
            elif pr_match:
                repo.prs[int(pr_match.group(1))] = commit.oid
            else:
                repo.branches[branch] = commit.oid
            for entry in files.values():
                if entry.lfs:
                    repo.lfs_objects.add(entry.sha256)
            self.persist(repo)
            return commit, pr_num

    def last_commit_touching(self, repo: Repo, oid: str, path: str, is_dir: bool) -> Commit:
        """Newest commit in the history of `oid` that changed `path` (a file, or anything under a folder)."""
        history = repo.history(oid)

        def view(c: Commit):
            if not is_dir:
                return c.files.get(path)
            prefix = path + "/" if path else ""
            return tuple(sorted((p, e) for p, e in c.files.items() if p.startswith(prefix)))

        for i, commit in enumerate(history):
            parent = history[i + 1] if i + 1 < len(history) else None
            if parent is None or view(commit) != view(parent):
                return commit
        return history[-1]


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def tree_id(files: dict[str, FileEntry], folder: str) -> str:
    prefix = folder + "/" if folder else ""
    h = hashlib.sha1()
    for p in sorted(files):
        if p.startswith(prefix):
            h.update(f"{p}\0{files[p].blob_id}\n".encode())
    return h.hexdigest()
