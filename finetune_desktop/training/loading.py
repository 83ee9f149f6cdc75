"""Opening a model by what a person types: 'base' (the embedded model), a model folder, a run
folder (its model/), or a repo id in the local Hugging Face cache. One place for the checks and
their messages, shared by training (`--base`), chat, quiz, validation and the app; each caller
passes the exception class its own users catch."""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from ..engine import Model
from ..engine.checkpoint import RUN_MODEL_SUBDIR, model_folder
from ..engine.errors import UserError


class ModelNotFound(UserError):
    """A model spec that names nothing usable."""


def base_model_dir() -> Path:
    """The embedded pretrained model (an HF folder), through importlib.resources so an installed
    wheel works as well as a checkout."""
    return Path(str(files("finetune_desktop").joinpath("resources", "base_model")))


def resolve_model_spec(spec: str) -> Path:
    """'base' -> the embedded model; a run folder -> its model/; a repo id found in the local
    Hugging Face cache -> its snapshot folder; anything else -> the path itself (checked later)."""
    if spec == "base":
        return base_model_dir()
    p = Path(spec).expanduser()
    if not p.exists():
        from .hf_cache import cached_snapshot

        snap = cached_snapshot(spec)
        if snap is not None:
            return snap
    return model_folder(p)


def run_of_model_folder(folder: Path) -> Path | None:
    """The run folder that holds this model/ folder, or None."""
    if folder.name == RUN_MODEL_SUBDIR and (folder.parent / "run.json").exists():
        return folder.parent
    return None


def _model_folder_or_raise(spec: str, error: type[Exception], needs: str = "config.json") -> tuple[Path, Path | None]:
    folder = resolve_model_spec(spec)
    if spec == "base" and not (folder / needs).exists():
        raise error(f"the embedded base model is not installed ({folder} has no config.json); "
                    "reinstall the app, or give a model folder")
    if not folder.exists():
        raise error(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise error(f"{folder} is a file, not a model folder")
    if (folder / "run.json").exists() and not (folder / needs).exists():  # a run without model/ yet
        status = "unknown"
        try:
            status = json.loads((folder / "run.json").read_text(encoding="utf-8")).get("status", status)
        except (OSError, ValueError, AttributeError):
            pass
        raise error(f"{folder}: this run has no model yet (status: {status})")
    if not (folder / needs).exists():
        raise error(f"{folder} is not a model folder (no {needs})")
    return folder, run_of_model_folder(folder)


def open_tokenizer(spec: str, error: type[Exception] = ModelNotFound):
    """The tokenizer (with its chat template) of a model spec."""
    from ..engine.tokenizer import Tokenizer

    folder, _ = _model_folder_or_raise(spec, error, needs="tokenizer.json")
    try:
        tok = Tokenizer.from_pretrained(folder)
    except UserError as e:
        raise error(str(e)) from None
    _check_template(tok, folder, error)
    return tok


def _check_template(tok, folder, error) -> None:
    if not tok.chat_template:
        raise error(f"{folder}: the tokenizer has no chat template, so conversations cannot be rendered "
                    "(add chat_template to tokenizer_config.json)")
    try:
        tok.check_chat_template()
    except UserError as e:
        raise error(str(e)) from None


def open_model(spec: str, error: type[Exception] = ModelNotFound):
    """-> (model, tokenizer, model_folder, run_dir or None). Raises `error` with a message that
    names the folder and the problem: not installed, missing, a run without a model yet, not a
    model folder, an unreadable model, or a tokenizer without a chat template."""
    from ..engine.tokenizer import Tokenizer

    folder, run_dir = _model_folder_or_raise(spec, error)
    try:
        model = Model.from_pretrained(folder)
        tok = Tokenizer.from_pretrained(folder)
    except UserError as e:
        raise error(str(e)) from None
    _check_template(tok, folder, error)
    return model, tok, Path(folder), run_dir
