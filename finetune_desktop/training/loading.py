"""Opening a model by what a person types: 'base' (the embedded model), a model folder, or a run
folder (its model/). One place for the checks and their messages, shared by training (`--base`)
and chat; each caller passes the exception class its own users catch."""
from __future__ import annotations

import json
from pathlib import Path

from ..engine import Model
from ..engine.config import ModelFormatError
from ..resources_path import resolve_model_path


def open_model(spec: str, error: type[Exception] = ValueError):
    """-> (model, tokenizer, model_folder, run_dir or None). Raises `error` with a message that
    names the folder and the problem: not installed, missing, a run without a model yet, not a
    model folder, an unreadable model, or a tokenizer without a chat template."""
    from ..engine.tokenizer import Tokenizer

    folder = resolve_model_path(spec)
    run_dir = None
    if spec == "base" and not (folder / "config.json").exists():
        raise error(f"the embedded base model is not installed ({folder} has no config.json); "
                    "reinstall the app, or give a model folder (train --base DIR)")
    if not folder.exists():
        raise error(f"model folder {folder} does not exist")
    if (folder / "run.json").exists():
        run_dir = folder
        if not (folder / "model" / "config.json").exists():
            status = "unknown"
            try:
                status = json.loads((folder / "run.json").read_text(encoding="utf-8")).get("status", status)
            except (OSError, ValueError, AttributeError):
                pass
            raise error(f"{folder}: this run has no model yet (status: {status})")
        folder = folder / "model"
    elif folder.name == "model" and (folder.parent / "run.json").exists():
        run_dir = folder.parent
    if not (folder / "config.json").exists():
        raise error(f"{folder} is not a model folder (no config.json)")
    try:
        model = Model.from_pretrained(folder)
        tok = Tokenizer.from_pretrained(folder)
    except ModelFormatError as e:
        raise error(str(e)) from None
    if not tok.chat_template:
        raise error(f"{folder}: the tokenizer has no chat template, so conversations cannot be rendered "
                    "(add chat_template to tokenizer_config.json)")
    return model, tok, Path(folder), run_dir
