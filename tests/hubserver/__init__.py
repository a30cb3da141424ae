"""Local Hugging Face Hub-compatible server for the test suite (stdlib only). See `tests/hub_server.py`."""

from .server import (
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
    User,
)

__all__ = [
    "COMMIT_PATH", "LFS_BATCH_PATH", "LFS_UPLOAD_PATH", "ORG", "OTHER_USER", "OTHER_WRITE_TOKEN", "PREUPLOAD_PATH",
    "READ_TOKEN", "READ_USER", "RESOLVE_PATH", "WRITE_TOKEN", "WRITE_USER", "HubServer", "User",
]
