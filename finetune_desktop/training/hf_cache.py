"""Models in the local Hugging Face cache, found by repo id ("HuggingFaceTB/SmolLM2-135M-Instruct")."""
from __future__ import annotations

import re
from pathlib import Path

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID_RE.match(spec))


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest complete snapshot folder of a model repo in the local cache, or None."""
    if not looks_like_repo_id(repo_id):
        return None
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return None
    try:
        info = scan_cache_dir()
    except (CacheNotFound, OSError):
        return None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id and repo.revisions:
            rev = max(repo.revisions, key=lambda r: r.last_modified)
            return Path(rev.snapshot_path)
    return None
