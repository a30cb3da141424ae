"""Pytest plugin: a local Hugging Face Hub for the whole test session (load with `pytest_plugins = ["hub_server"]`).

Importing this module (which pytest does while loading `tests/conftest.py`) starts ONE `HubServer` on
127.0.0.1 and points every client at it *before* the tests import huggingface_hub/datasets/transformers/timm:

    HF_ENDPOINT=http://127.0.0.1:<port>   HF_HUB_DISABLE_XET=1   HF_HUB_DISABLE_TELEMETRY=1
    HF_UPDATE_DOWNLOAD_COUNTS=0 (datasets would HEAD s3.amazonaws.com otherwise)
    HF_TOKEN / HUGGING_FACE_HUB_TOKEN / HUGGINGFACE_CO_STAGING / *_OFFLINE are removed from the environment.

Modules that were imported earlier (they read those variables at import time) are patched as well, see
`patch_clients`. The real huggingface.co is never contacted and the clients are never mocked.

Fixtures:
    hub_server (session): the running `HubServer` (storage shared by the whole session).
    hub (function): the same server, emptied at the start of the test (`reset()`), env re-asserted, the
        fsspec `HfFileSystem` instance cache cleared (its directory listings would be stale otherwise).

Tokens (module constants, also attributes of the server): WRITE_TOKEN (user `tester`, writes `tester/*` and
`test-org/*`), READ_TOKEN (user `reader`, read-only), OTHER_WRITE_TOKEN (user `other`, writes `other/*`).
No token => 401 on writes; unknown token => 401 everywhere; foreign namespace / read-only token => 403;
private repos => RepoNotFound (401 anonymous, 404 authenticated) for everyone but the namespace's members.

Server helpers (see hubserver/server.py):
    hub.url                                   endpoint, same as os.environ["HF_ENDPOINT"]
    hub.fail_next(path_regex, status=500, times=1, method=None, message=None)
        next matching request(s) fail and change nothing. huggingface_hub RETRIES 408/429/5xx on most calls
        (not on the commit POST): use a 4xx or times>=6 there. Regexes: LFS_UPLOAD_PATH, LFS_BATCH_PATH,
        PREUPLOAD_PATH, COMMIT_PATH, RESOLVE_PATH.   hub.clear_failures(), hub.pending_failures
    hub.list_files(repo_id, repo_type="model", revision="main") -> {path: bytes}   (includes .gitattributes)
    hub.file_entries(...) -> {path: {"size", "lfs", "sha256", "blob_id"}}
    hub.commits(repo_id, repo_type="model", revision="main") -> [{"oid", "parent", "title", "message",
        "author", "date", "files"}], newest first (the first commit is the Hub's "initial commit")
    hub.head(repo_id, repo_type, revision) -> sha;  hub.refs(...);  hub.repo_exists(...);  hub.is_private(...)
    hub.create_repo(repo_id, repo_type="model", private=False, exist_ok=False)       seeding without HTTP
    hub.upload_files(repo_id, {path: bytes | str}, repo_type="model", revision="main", message=..., delete=())
    hub.new_repo_id(name="repo", namespace="tester") -> a never-used id;  hub.reset()
    hub.requests -> [(method, path?query, status)] of every request served since the last reset()
"""

from __future__ import annotations

import atexit
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
from hubserver import (  # noqa: E402,F401  (re-exported for tests: `from hub_server import WRITE_TOKEN`)
    COMMIT_PATH,
    LFS_BATCH_PATH,
    LFS_UPLOAD_PATH,
    ORG,
    OTHER_USER,
    OTHER_WRITE_TOKEN,
    PREUPLOAD_PATH,
    READ_TOKEN,
    READ_USER,
    RESOLVE_PATH,
    WRITE_TOKEN,
    WRITE_USER,
    HubServer,
)

SERVER = HubServer().start()
atexit.register(SERVER.stop)
ENDPOINT = SERVER.url
for _name, _value in {"WRITE_TOKEN": WRITE_TOKEN, "READ_TOKEN": READ_TOKEN, "OTHER_WRITE_TOKEN": OTHER_WRITE_TOKEN,
                      "WRITE_USER": WRITE_USER, "READ_USER": READ_USER, "ORG": ORG}.items():
    setattr(SERVER, _name, _value)

HUB_ENV = {
    "HF_ENDPOINT": ENDPOINT,
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
}
HUB_ENV_REMOVED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING", "HF_HUB_OFFLINE",
                   "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def patch_clients(endpoint: str = ENDPOINT) -> None:
    """Point already-imported huggingface_hub / datasets at `endpoint` (values they computed at import time).

    transformers and timm have no endpoint of their own: they go through huggingface_hub.
    """
    from urllib.parse import urlsplit

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.ENDPOINT = endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_URL_HOSTS = frozenset(constants.HF_URL_HOSTS | {urlsplit(endpoint).hostname})
        constants.HF_HUB_DISABLE_XET = True
        constants.HF_HUB_DISABLE_TELEMETRY = True
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None and hasattr(http, "_HUB_ORIGINS") and hasattr(http, "_url_origin"):
        http._HUB_ORIGINS = frozenset(http._HUB_ORIGINS | {http._url_origin(endpoint)})
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None and hasattr(hf_api, "api"):
        hf_api.api.endpoint = endpoint  # module-level HfApi() behind `huggingface_hub.model_info` & co
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_ENDPOINT = endpoint
        ds_config.HUB_DATASETS_URL = endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        ds_config.HF_UPDATE_DOWNLOAD_COUNTS = False


def _apply_env() -> None:
    os.environ.update(HUB_ENV)
    for var in HUB_ENV_REMOVED:
        os.environ.pop(var, None)


_apply_env()
import huggingface_hub.constants  # noqa: E402,F401  (reads the env above; patch in case it was imported before)

patch_clients(ENDPOINT)


def _clear_client_caches() -> None:
    hffs = sys.modules.get("huggingface_hub.hf_file_system")
    if hffs is not None:
        hffs.HfFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The session's local Hub (not emptied between tests; prefer `hub`)."""
    patch_clients(ENDPOINT)
    return SERVER


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch):
    """The local Hub, emptied for this test, with HF_ENDPOINT & co set and clients patched."""
    for key, value in HUB_ENV.items():
        monkeypatch.setenv(key, value)
    for var in HUB_ENV_REMOVED:
        monkeypatch.delenv(var, raising=False)
    patch_clients(ENDPOINT)
    hub_server.reset()
    _clear_client_caches()
    yield hub_server
    hub_server.clear_failures()
    _clear_client_caches()
