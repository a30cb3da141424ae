"""The local Hub server, exercised through the real (unmocked) huggingface_hub and datasets clients."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hub_server import (
    COMMIT_PATH,
    LFS_UPLOAD_PATH,
    OTHER_WRITE_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
)
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    constants,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(token=WRITE_TOKEN)  # default endpoint: proves the constants point at the local hub


def _write_model_folder(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"architectures": ["ResNet"], "model_type": "resnet"}',
        "notes/readme.txt": "résumé of the model\n".encode(),
        "model.safetensors": os.urandom(150_000),
        "weights/extra.bin": os.urandom(2_000),
        "preview.png": b"\x89PNG\r\n\x1a\n" + os.urandom(500),
        "tiny_binary.dat": b"ab\x00cd",  # binary content => LFS even without a matching pattern
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


def _status(exc_info) -> int:
    return exc_info.value.response.status_code


def test_clients_point_at_local_hub(hub):
    import datasets

    assert constants.ENDPOINT == hub.url
    assert datasets.config.HF_ENDPOINT == hub.url
    assert HfApi().endpoint == hub.url
    assert hf_hub_url("a/b", "c.txt").startswith(hub.url + "/a/b/resolve/main/")
    assert constants.HF_HUB_DISABLE_XET
    assert HfApi(token=WRITE_TOKEN).whoami()["name"] == "tester"
    assert HfApi(token=READ_TOKEN).whoami()["auth"]["accessToken"]["role"] == "read"


def test_create_repo_and_conflict(api, hub):
    url = api.create_repo("tester/created")
    assert url.repo_id == "tester/created" and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("tester/created")
    assert _status(exc) == 409
    assert exc.value.response.json()["url"] == f"{hub.url}/tester/created"
    assert api.create_repo("tester/created", exist_ok=True).repo_id == "tester/created"
    assert api.create_repo("test-org/ds", repo_type="dataset").startswith(f"{hub.url}/datasets/test-org/ds")
    assert hub.repo_exists("test-org/ds", "dataset") and not hub.repo_exists("test-org/ds")
    api.delete_repo("tester/created")
    assert not hub.repo_exists("tester/created")


def test_upload_folder_download_roundtrip(api, hub, tmp_path):
    repo_id = api.create_repo("tester/model").repo_id
    files = _write_model_folder(tmp_path / "src")
    info = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", commit_message="Add model")

    commits = hub.commits(repo_id)
    assert [c["title"] for c in commits] == ["Add model", "initial commit"]  # ONE commit for the folder
    assert commits[0]["oid"] == info.oid == hub.head(repo_id)
    entries = hub.file_entries(repo_id)
    lfs = {p for p, e in entries.items() if e["lfs"]}
    assert lfs == {"model.safetensors", "weights/extra.bin", "preview.png", "tiny_binary.dat"}
    stored = hub.list_files(repo_id)
    assert {p: stored[p] for p in files} == files

    cache = tmp_path / "cache"
    for path, data in files.items():
        assert Path(hf_hub_download(repo_id, path, cache_dir=cache)).read_bytes() == data
    snap = Path(snapshot_download(repo_id, cache_dir=tmp_path / "snap"))
    assert {p: (snap / p).read_bytes() for p in files} == files

    # a second commit; the first one stays downloadable by sha
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="config.json", repo_id=repo_id)
    old = Path(snapshot_download(repo_id, revision=info.oid, cache_dir=tmp_path / "old"))
    assert (old / "config.json").read_bytes() == files["config.json"]
    assert Path(hf_hub_download(repo_id, "config.json", revision=info.oid, cache_dir=tmp_path / "c2")).read_bytes() \
        == files["config.json"]
    assert Path(hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "c3")).read_bytes() == b"v2"

    # metadata endpoints
    mi = api.model_info(repo_id, files_metadata=True)
    assert mi.sha == hub.head(repo_id) and mi.private is False
    sib = {s.rfilename: s for s in mi.siblings}
    assert sib["model.safetensors"].lfs.sha256 == entries["model.safetensors"]["sha256"]
    assert sib["model.safetensors"].size == 150_000
    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id)}
    assert top["notes"] == "RepoFolder" and top["config.json"] == "RepoFile" and "notes/readme.txt" not in top
    deep = {e.path for e in api.list_repo_tree(repo_id, recursive=True)}
    assert {"notes", "weights", "notes/readme.txt", "weights/extra.bin"} <= deep
    sub = [e.path for e in api.list_repo_tree(repo_id, path_in_repo="weights", expand=True)]
    assert sub == ["weights/extra.bin"]
    paths = api.get_paths_info(repo_id, ["model.safetensors", "notes", "missing.txt"])
    assert [p.path for p in paths] == ["model.safetensors", "notes"]

    # HEAD metadata and Range requests, as the real Hub serves them
    url = hf_hub_url(repo_id, "model.safetensors")
    head = get_session().head(url)
    assert head.headers["X-Repo-Commit"] == hub.head(repo_id)
    assert head.headers["X-Linked-Etag"].strip('"') == entries["model.safetensors"]["sha256"]
    assert int(head.headers["X-Linked-Size"]) == 150_000
    part = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == files["model.safetensors"][10:20]
    with HfFileSystem(token=WRITE_TOKEN).open(f"{repo_id}/model.safetensors", "rb", block_size=1024) as f:
        f.seek(100_000)
        assert f.read(50) == files["model.safetensors"][100_000:100_050]


def test_missing_entries_repos_revisions(api, hub, tmp_path):
    repo_id = api.create_repo("tester/errors").repo_id
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.txt", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "x.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/does-not-exist")
    head = get_session().head(hf_hub_url(repo_id, "nope.txt"))
    assert head.status_code == 404 and head.headers["X-Error-Code"] == "EntryNotFound"


def test_branches_tags_and_history(api, hub, tmp_path):
    repo_id = api.create_repo("tester/branches").repo_id
    api.upload_file(path_or_fileobj=b"main", path_in_repo="f.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo_id, revision="dev")
    api.create_tag(repo_id, tag="v1", revision="dev")
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert [c.title for c in api.list_repo_commits(repo_id, revision="dev")] == [
        "Upload f.txt with huggingface_hub", "Upload f.txt with huggingface_hub", "initial commit"]
    assert Path(hf_hub_download(repo_id, "f.txt", revision="v1", cache_dir=tmp_path)).read_bytes() == b"dev"
    assert hub.list_files(repo_id)["f.txt"] == b"main"
    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="f.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub.list_files(repo_id, revision="refs/pr/1")["f.txt"] == b"pr"


def test_model_card_roundtrip(api, hub):
    repo_id = api.create_repo("tester/card").repo_id
    content = "---\nlicense: mit\ntags:\n- dfq\nlibrary_name: timm\n---\n\n# Compressed model\n\nHello.\n"
    ModelCard(content).push_to_hub(repo_id, token=WRITE_TOKEN)
    card = ModelCard.load(repo_id)
    assert card.data.license == "mit" and card.data.tags == ["dfq"] and "# Compressed model" in card.text
    info = api.model_info(repo_id)
    assert info.card_data.license == "mit" and "dfq" in info.tags and info.library_name == "timm"
    with pytest.raises(ValueError, match="Invalid YAML"):  # server-side /api/validate-yaml rejects it
        api.upload_file(path_or_fileobj=b"---\nlicense: [mit\n---\nbroken\n", path_in_repo="README.md",
                        repo_id=repo_id)
    assert len(hub.commits(repo_id)) == 2


def test_dataset_push_and_load_with_images(hub, tmp_path):
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcde"))})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 4]}, features=features)
    ds.push_to_hub("tester/images", token=WRITE_TOKEN)
    assert hub.file_entries("tester/images", "dataset")["data/train-00000-of-00001.parquet"]["lfs"]

    back = datasets.load_dataset("tester/images", split="train", cache_dir=str(tmp_path / "ds"))
    assert back.features == features and back["label"] == [0, 1, 2, 3, 4]
    for got, want in zip(back["image"], images):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_auth_required_for_writes(hub):
    anonymous = HfApi(token=False)
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.create_repo("tester/anon")
    assert _status(exc) == 401
    HfApi(token=WRITE_TOKEN).create_repo("tester/public")
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/public")
    assert _status(exc) == 401
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token="hf_not_a_valid_token").model_info("tester/public")
    assert _status(exc) == 401
    assert anonymous.model_info("tester/public").id == "tester/public"  # public reads need no token


def test_forbidden_namespaces(hub):
    writer = HfApi(token=WRITE_TOKEN)
    with pytest.raises(HfHubHTTPError) as exc:
        writer.create_repo("someone-else/model")
    assert _status(exc) == 403 and "someone-else" in str(exc.value)
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(token=READ_TOKEN).create_repo("reader/model")
    assert _status(exc) == 403 and "read-only" in str(exc.value)
    HfApi(token=OTHER_WRITE_TOKEN).create_repo("other/public")
    with pytest.raises(HfHubHTTPError) as exc:
        writer.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="other/public")
    assert _status(exc) == 403
    assert hub.commits("other/public")[0]["title"] == "initial commit"


def test_private_repo_invisible_to_others(hub, tmp_path):
    owner = HfApi(token=WRITE_TOKEN)
    owner.create_repo("tester/secret", private=True)
    owner.upload_file(path_or_fileobj=b"s3cret", path_in_repo="s.txt", repo_id="tester/secret")
    assert owner.model_info("tester/secret").private is True
    for other in (HfApi(token=READ_TOKEN), HfApi(token=OTHER_WRITE_TOKEN), HfApi(token=False)):
        with pytest.raises(RepositoryNotFoundError):
            other.model_info("tester/secret")
        with pytest.raises(RepositoryNotFoundError):
            other.hf_hub_download("tester/secret", "s.txt", cache_dir=tmp_path)
        assert "tester/secret" not in [m.id for m in other.list_models(author="tester")]
    assert "tester/secret" in [m.id for m in owner.list_models(author="tester")]
    owner.create_repo("test-org/team-secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=READ_TOKEN).list_repo_files("test-org/team-secret")
    owner.create_repo("tester/later-private")
    assert HfApi(token=READ_TOKEN).model_info("tester/later-private").private is False
    owner.update_repo_settings("tester/later-private", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=READ_TOKEN).model_info("tester/later-private")


def test_failed_upload_leaves_no_partial_commit(api, hub, tmp_path):
    repo_id = api.create_repo("tester/atomic").repo_id
    first = _write_model_folder(tmp_path / "v1")
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "v1", commit_message="v1")
    head, before = hub.head(repo_id), hub.list_files(repo_id)

    second = tmp_path / "v2"
    _write_model_folder(second)  # new random weights
    (second / "config.json").write_bytes(b'{"v": 2}')
    hub.fail_next(LFS_UPLOAD_PATH, status=403)  # 4xx: not retried by huggingface_hub
    with pytest.raises(Exception):
        api.upload_folder(repo_id=repo_id, folder_path=second, commit_message="v2")
    assert hub.head(repo_id) == head and hub.list_files(repo_id) == before

    hub.fail_next(COMMIT_PATH, status=500)  # the commit POST is not retried
    with pytest.raises(HfHubHTTPError):
        api.upload_folder(repo_id=repo_id, folder_path=second, commit_message="v2")
    assert hub.head(repo_id) == head and hub.list_files(repo_id) == before
    assert hub.pending_failures == 0

    # a commit the server rejects halfway (deleting a missing file) applies none of its operations
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, commit_message="bad", operations=[
            CommitOperationAdd("added.txt", b"new"), CommitOperationDelete("no-such-file.txt")])
    with pytest.raises(HfHubHTTPError) as exc:  # stale parent commit
        api.create_commit(repo_id, commit_message="stale", parent_commit=hub.commits(repo_id)[1]["oid"],
                          operations=[CommitOperationAdd("added.txt", b"new")])
    assert _status(exc) == 412
    assert hub.head(repo_id) == head and hub.list_files(repo_id) == before
    assert before["model.safetensors"] == first["model.safetensors"]

    api.upload_folder(repo_id=repo_id, folder_path=second, commit_message="v2")
    assert hub.list_files(repo_id)["config.json"] == b'{"v": 2}'


def test_transformers_reads_from_local_hub(hub, tmp_path):
    transformers = pytest.importorskip("transformers")
    hub.upload_files("tester/tiny-config", {
        "config.json": b'{"model_type": "resnet", "hidden_sizes": [8, 16], "num_channels": 3}'})
    cfg = transformers.AutoConfig.from_pretrained("tester/tiny-config", cache_dir=tmp_path)
    assert cfg.model_type == "resnet" and cfg.hidden_sizes == [8, 16]
    assert any("/tester/tiny-config/resolve/" in path for _, path, _ in hub.requests)


def test_lfs_upload_checks_sha256_and_size(hub):
    import hashlib

    HfApi(token=WRITE_TOKEN).create_repo("tester/lfs")
    data = os.urandom(100)
    oid = hashlib.sha256(data).hexdigest()
    batch_url = f"{hub.url}/tester/lfs.git/info/lfs/objects/batch"
    headers = {"Authorization": f"Bearer {WRITE_TOKEN}", "Accept": "application/vnd.git-lfs+json"}
    payload = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": 100}]}
    obj = get_session().post(batch_url, json=payload, headers=headers).json()["objects"][0]
    href = obj["actions"]["upload"]["href"]
    assert get_session().put(href, content=os.urandom(100)).status_code == 400  # wrong sha256
    assert get_session().put(href, content=data[:50]).status_code == 400  # wrong size
    assert get_session().put(href, content=data).status_code == 200
    again = get_session().post(batch_url, json=payload, headers=headers).json()["objects"][0]
    assert "actions" not in again  # already uploaded: nothing to do
    assert get_session().post(batch_url, json=payload).status_code == 401
