"""Models in the local Hugging Face cache, found by repo id ("HuggingFaceTB/SmolLM2-135M-Instruct"):
find one (cached_snapshot), list them all with whether this app can load each
(list_cached_models), and download one (download_model).

The cache is the one huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub, laid out as models--org--name/{blobs,refs,snapshots/<commit>/...}.
Nothing here loads weights or runs code from the cache; listing reads config.json only."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.errors import UserError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# what download_model fetches: weights in safetensors, configs, tokenizer files (never pickles)
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "chat_template.jinja", "merges.txt", "vocab.json"]


class HubError(UserError):
    """A model that cannot be listed or downloaded; one line saying why."""


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID_RE.match(spec))


def hub_cache_dir() -> Path:
    """The cache folder huggingface_hub uses, read from the environment now (not at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _scan(cache_dir=None):
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return None
    try:
        return scan_cache_dir(cache_dir=str(cache_dir or hub_cache_dir()))
    except (CacheNotFound, OSError, ValueError):
        return None


def cached_snapshot(repo_id: str, cache_dir=None) -> Path | None:
    """The newest snapshot folder of a model repo in the local cache, or None."""
    if not looks_like_repo_id(repo_id):
        return None
    info = _scan(cache_dir)
    if info is None:
        return None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id and repo.revisions:
            rev = max(repo.revisions, key=lambda r: r.last_modified)
            return Path(rev.snapshot_path)
    return None


@dataclass(frozen=True)
class CachedModel:
    repo_id: str
    size_on_disk: int              # bytes, all revisions
    snapshot_path: str             # the newest revision's folder
    revision: str                  # its commit hash
    loadable: bool
    reason: str | None             # why not, when not loadable
    model_type: str | None = None
    num_parameters: int | None = None


def check_model_folder(folder) -> tuple[str | None, object]:
    """-> (reason this app cannot load the folder or None, its ModelConfig or None). Reads
    config.json only; weights are not opened."""
    from ..engine.config import ModelConfig, ModelFormatError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return "no config.json", None
    try:
        cfg = ModelConfig.from_json_file(folder / "config.json")
    except ModelFormatError as e:
        msg = str(e)
        prefix = f"{folder / 'config.json'}: "
        return (msg[len(prefix):] if msg.startswith(prefix) else msg), None
    names = {p.name for p in folder.iterdir()}
    if not any(n.endswith(".safetensors") for n in names) and "model.safetensors.index.json" not in names:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        return ("only PyTorch pickle weights (not loaded, for safety)" if pickles else "no safetensors weights"), cfg
    if "tokenizer.json" not in names:
        return ("only a SentencePiece tokenizer.model (tokenizer.json needed)" if "tokenizer.model" in names
                else "no tokenizer.json"), cfg
    return None, cfg


def list_cached_models(cache_dir=None) -> list[CachedModel]:
    """Every model repo in the local cache, largest first, with whether it can be loaded."""
    info = _scan(cache_dir)
    if info is None:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        reason, cfg = check_model_folder(rev.snapshot_path)
        out.append(CachedModel(repo_id=repo.repo_id, size_on_disk=int(repo.size_on_disk),
                               snapshot_path=str(rev.snapshot_path), revision=rev.commit_hash,
                               loadable=reason is None, reason=reason,
                               model_type=getattr(cfg, "model_type", None),
                               num_parameters=cfg.num_parameters() if cfg is not None else None))
    out.sort(key=lambda m: (-m.size_on_disk, m.repo_id))
    return out


def _progress_class(progress: Callable[[str, int, int | None], None]):
    """A tqdm class for huggingface_hub that reports (description, done, total) to `progress`
    instead of drawing bars."""
    from tqdm.auto import tqdm

    class _Report(tqdm):
        def __init__(self, *a, **kw):
            kw["disable"] = False
            kw.pop("name", None)
            kw["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            super().__init__(*a, **kw)

        def update(self, n=1):
            r = super().update(n)
            try:
                progress(str(self.desc or ""), int(self.n), int(self.total) if self.total else None)
            except Exception:  # noqa: BLE001 - a progress callback never breaks a download
                pass
            return r

        def close(self):
            f = self.fp
            super().close()
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    return _Report


def download_model(repo_id: str, progress: Callable[[str, int, int | None], None] | None = None,
                   cache_dir=None, revision: str | None = None, endpoint: str | None = None) -> Path:
    """Download a model repo's safetensors, configs and tokenizer files into the local cache and
    return its snapshot folder. progress(description, done, total) is called as files and bytes
    arrive; endpoint: a Hub mirror (default: huggingface_hub's, or $HF_ENDPOINT). HubError (one
    line) when offline, unknown, gated or the download fails."""
    if not looks_like_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hugging Face repo id (expected org/name)")
    if _offline():
        raise HubError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE); "
                       "models already in the local cache still load")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise HubError("huggingface_hub is not installed, so models cannot be downloaded") from None
    kw = {}
    if progress is not None:
        kw["tqdm_class"] = _progress_class(progress)
    try:
        path = snapshot_download(repo_id, repo_type="model", revision=revision,
                                 cache_dir=str(cache_dir or hub_cache_dir()),
                                 allow_patterns=DOWNLOAD_PATTERNS, endpoint=endpoint, **kw)
    except hub_errors.GatedRepoError:
        raise HubError(f"{repo_id}: the repo is gated; accept its terms on the Hub and log in first") from None
    except hub_errors.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private)") from None
    except hub_errors.RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found on the Hugging Face Hub") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled):
        raise HubError(f"cannot download {repo_id}: the Hugging Face Hub cannot be reached "
                       "(offline?) and the model is not in the local cache") from None
    except hub_errors.HfHubHTTPError as e:
        raise HubError(f"cannot download {repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except OSError as e:
        raise HubError(f"cannot download {repo_id}: {e.strerror or e}") from None
    return Path(path)
