"""Loaded (Model, Tokenizer) pairs for chat, shared by the generation workers.

A spec is a model folder, or "<kind>::<path>::<path>" for which a loader is registered:
the app registers "adapter::<base>::<adapter folder>" (a PEFT adapter on a base model) and
"checkpoint::<run>::<checkpoint dir>" (a run's checkpoint on its base model). No Qt here."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import PurePath
from typing import Callable

Loader = Callable[..., tuple]   # loader(*paths of the spec) -> (Model, Tokenizer)


def load_folder(folder: str):
    from ..engine import Model, Tokenizer
    return Model.from_pretrained(folder), Tokenizer.from_pretrained(folder)


def load_adapter(base: str, adapter: str):
    from ..engine import Model, Tokenizer
    model = Model.from_pretrained(base)
    model.load_adapter(adapter)
    return model, Tokenizer.from_pretrained(base)


def load_checkpoint(run_dir: str, ckpt_dir: str):
    from .bridge import load_checkpoint_model
    return load_checkpoint_model(run_dir, ckpt_dir)


def spec_kind(spec: str) -> str:
    """"checkpoint::a::b" -> "checkpoint::"; a folder -> ""."""
    return spec.split("::", 1)[0] + "::" if "::" in spec else ""


def spec_paths(spec: str) -> list[str]:
    """The paths a spec is made of."""
    return spec.split("::")[1:] if "::" in spec else [spec]


def _norm(path: str) -> PurePath:
    return PurePath(os.path.normpath(os.path.abspath(path)))


def is_within(path: str, folder: str) -> bool:
    """Is `path` the folder itself or inside it? Whole path components: run-10 is not in run-1."""
    p, f = _norm(path), _norm(folder)
    return p == f or f in p.parents


class ModelCache:
    """Thread-safe, least recently used pairs first out."""

    def __init__(self, max_items: int = 3, loaders: dict[str, Loader] | None = None):
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}   # spec -> set when its load ends
        self._loaders: dict[str, Loader] = {"": load_folder}
        self._loaders.update(loaders or {})
        self.max_items = max_items

    def register_loader(self, kind: str, loader: Loader) -> None:
        """kind: the spec's prefix with its "::" (e.g. "checkpoint::")."""
        if not kind.endswith("::"):
            raise ValueError(f"a spec kind ends with '::', not {kind!r}")
        self._loaders[kind] = loader

    def get(self, spec: str):
        """The (Model, Tokenizer) of spec, loaded on first use. Two threads asking for the same
        spec at once (a preload and a reply) share one load."""
        with self._lock:
            hit = self._items.get(spec)
            if hit is not None:
                self._items.move_to_end(spec)
                return hit
            done = self._loading.get(spec)
            if done is None:
                self._loading[spec] = threading.Event()
        if done is not None:  # another thread is loading it: wait, then look again (or load, if it failed)
            done.wait()
            return self.get(spec)
        try:
            kind = spec_kind(spec)
            loader = self._loaders.get(kind)
            if loader is None:
                raise ValueError(f"unknown model spec {spec!r}")
            pair = loader(*spec_paths(spec))       # slow: outside the lock
            # pack the decoding weights now, on this (worker) thread, so the first reply does not
            # wait for it: over a second on a 135M model, a few ms on the built-in one
            pair[0].decode_weights()
            with self._lock:
                self._items[spec] = pair
                self._items.move_to_end(spec)
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            return pair
        finally:
            with self._lock:
                self._loading.pop(spec).set()

    def drop(self, path: str) -> list[str]:
        """Forget every pair loaded from `path` or from anything inside it (a run folder, a model
        folder). Returns the specs dropped."""
        with self._lock:
            gone = [k for k in self._items if any(is_within(p, path) for p in spec_paths(k))]
            for k in gone:
                del self._items[k]
        return gone

    def specs(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def __contains__(self, spec: str) -> bool:
        with self._lock:
            return spec in self._items


def make_model_cache(max_items: int = 3) -> ModelCache:
    """The app's cache: folders, adapters and run checkpoints."""
    return ModelCache(max_items, {"adapter::": load_adapter, "checkpoint::": load_checkpoint})
