"""push_folder: one commit, clear errors, nothing partial on the server."""

from __future__ import annotations

import pytest
from hub_server import (
    COMMIT_PATH,
    LFS_UPLOAD_PATH,
    OTHER_WRITE_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
)

from hub_dfq.errors import PublishError
from hub_dfq.publish import push_folder


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 2048)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "blob.bin").write_bytes(b"\x01" * 400)
    return tmp_path


def own_files(hub, repo_id, repo_type="model"):
    return {k: v for k, v in hub.list_files(repo_id, repo_type).items() if k != ".gitattributes"}


@pytest.mark.parametrize("repo_type", ["model", "dataset"])
def test_push_is_one_commit_identical_to_the_folder(hub, folder, repo_type):
    repo_id = hub.new_repo_id()
    result = push_folder(folder, repo_id, repo_type=repo_type, token=WRITE_TOKEN)
    assert result.commit == hub.head(repo_id, repo_type)
    files = own_files(hub, repo_id, repo_type)
    assert files == {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert len(hub.commits(repo_id, repo_type)) == 2  # the Hub's initial commit + ours
    push_folder(folder, repo_id, repo_type=repo_type, token=WRITE_TOKEN, private=True)  # exists: fine


def test_push_to_branch(hub, folder):
    repo_id = hub.new_repo_id()
    push_folder(folder, repo_id, token=WRITE_TOKEN, revision="v1")
    assert "model.safetensors" in hub.list_files(repo_id, revision="v1")


@pytest.mark.parametrize(
    "token,message",
    [(None, "without a valid token"), (READ_TOKEN, "cannot write"), (OTHER_WRITE_TOKEN, "cannot write")],
    ids=["no-token", "read-only", "foreign-namespace"],
)
def test_auth_errors_keep_the_local_folder(hub, folder, token, message):
    before = sorted(p.as_posix() for p in folder.rglob("*"))
    with pytest.raises(PublishError, match=message) as err:
        push_folder(folder, "tester/secret", token=token)
    assert str(folder) in str(err.value)
    assert sorted(p.as_posix() for p in folder.rglob("*")) == before


@pytest.mark.parametrize("path", [COMMIT_PATH, LFS_UPLOAD_PATH], ids=["commit", "lfs-upload"])
def test_server_error_leaves_no_partial_commit(hub, folder, path):
    repo_id = hub.new_repo_id()
    hub.create_repo(repo_id)
    head = hub.head(repo_id)
    hub.fail_next(path, status=500 if path == COMMIT_PATH else 403, times=1)
    with pytest.raises(PublishError, match="nothing was committed|cannot write"):
        push_folder(folder, repo_id, token=WRITE_TOKEN)
    assert hub.head(repo_id) == head and own_files(hub, repo_id) == {}
    push_folder(folder, repo_id, token=WRITE_TOKEN)  # a retry succeeds
    assert "model.safetensors" in own_files(hub, repo_id)
