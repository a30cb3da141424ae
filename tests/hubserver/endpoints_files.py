"""Endpoints: preupload, LFS batch/upload/verify, NDJSON commit, file downloads (resolve)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from urllib.parse import quote

from .storage import FileEntry, HubError, is_lfs_path, validate_path
from .util import TYPE_FROM_PLURAL, TYPE_FROM_URL_PREFIX, split_rev, truthy


class FileEndpoints:
    """Mixed into `handler.Handler` (uses its `_repo`, `_send_json`, ... helpers)."""

    # -- upload: preupload, LFS, commit --------------------------------------------------------------------
    def h_preupload(self, type: str, ns: str, name: str, rev: str) -> None:
        repo, _ = self._repo(TYPE_FROM_PLURAL[type], f"{ns}/{name}", write=True)
        revision = split_rev(rev)[0]
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
        repo_type = TYPE_FROM_URL_PREFIX[prefix]
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
        revision = split_rev(rev)[0]
        create_pr = truthy((self.query.get("create_pr") or [None])[0])
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
        repo_type = TYPE_FROM_URL_PREFIX[prefix]
        repo, _ = self._repo(repo_type, f"{ns}/{name}")
        rev, path = split_rev(rest)
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
