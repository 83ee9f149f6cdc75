"""Where the shipped resources are, through importlib.resources so an installed wheel works."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def base_model_dir() -> Path:
    """The embedded pretrained model (an HF folder)."""
    return Path(str(files("finetune_desktop").joinpath("resources", "base_model")))


def resolve_model_path(spec: str) -> Path:
    """'base' -> the embedded model; a run folder -> its model/; else the folder itself."""
    if spec == "base":
        return base_model_dir()
    p = Path(spec).expanduser()
    if (p / "model" / "config.json").exists() and not (p / "config.json").exists():
        return p / "model"
    return p
