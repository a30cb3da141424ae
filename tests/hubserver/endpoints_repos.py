"""Endpoints: account, repo management, repo info, refs/history, tree listings."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, unquote

from .storage import (
    REPO_TYPES,
    URL_PREFIXES,
    HubError,
    Repo,
    iso,
    parse_front_matter,
    safetensors_summary,
    tree_id,
)
from .util import TYPE_FROM_PLURAL, split_rev, truthy


class RepoEndpoints:
    """Mixed into `handler.Handler` (uses its `_repo`, `_send_json`, ... helpers)."""

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
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in list(repo.branches.items())],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in list(repo.tags.items())],
        }
        if truthy((self.query.get("include_prs") or [None])[0]):
            out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                                   for n, o in sorted(list(repo.prs.items()))]
        self._send_json(out)

    def h_list_commits(self, type: str, ns: str, name: str, rev: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}")
        oid = self._resolve(repo, split_rev(rev)[0])
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
        rev, path = split_rev(rest)
        path = path.strip("/")
        oid = self._resolve(repo, rev)
        recursive = truthy((self.query.get("recursive") or [None])[0])
        expand = truthy((self.query.get("expand") or [None])[0])
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
        oid = self._resolve(repo, split_rev(rev)[0])
        raw = self.body.read()
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            payload = json.loads(raw or b"{}")
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
            paths = [paths] if isinstance(paths, str) else paths
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = truthy((form.get("expand") or [None])[0])
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
