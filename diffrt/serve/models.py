"""The bundles one server serves: named, loaded lazily, the least recently used unloaded beyond `max_loaded`.

Manifests are read at start-up (cheap, and a bad path fails then, in one line); a Pipeline is loaded on the
engine thread the first time a request names its bundle. The first bundle is the default and is loaded (and
warmed up) at start-up.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.bundle import Manifest, load_manifest
from diffrt.engine.request import Request
from diffrt.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    name: str  # the bundle directory's name without ".bundle": what clients send as `model`
    path: str
    manifest: Manifest

    @property
    def sha256(self) -> str:
        return self.manifest.source.get("sha256", "")

    @property
    def short_hash(self) -> str:
        """A1111's short checkpoint hash: the first 10 hex digits of the weights' SHA-256."""
        return self.sha256[:10]

    @property
    def title(self) -> str:
        """A1111's checkpoint title, "name [hash]"."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name


def model_name(path: str) -> str:
    name = Path(path).resolve().name
    return name.removesuffix(".bundle") or name


class ModelPool:
    """Named bundles; `pipeline(name)` (engine thread only) loads on first use and unloads the least recently
    used one beyond `max_loaded`."""

    def __init__(self, paths: list[str], load: Callable[[str], Any], max_loaded: int = 1):
        if not paths:
            raise BadInput("serve needs at least one bundle")
        if max_loaded < 1:
            raise BadInput(f"--max-loaded must be >= 1, got {max_loaded}")
        self.models: dict[str, Model] = {}
        for path in paths:
            name = model_name(path)
            if name in self.models:
                raise BadInput(f"two bundles are named {name!r}; rename one directory")
            self.models[name] = Model(name, path, load_manifest(Path(path)))
        self.default = next(iter(self.models))
        self.max_loaded = max_loaded
        self._load = load
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _loaded: read from the event loop, changed by the engine thread

    def find(self, name: str | None) -> Model:
        """The model a client names: its name, A1111 title, short or full hash, or the bundle's directory name.
        None or "" is the default. BadInput (field "model") naming the known ones otherwise."""
        if not name:
            return self.models[self.default]
        for m in self.models.values():
            if name in (m.name, m.title, Path(m.path).name) or (m.short_hash and name in (m.short_hash, m.sha256)):
                return m
        known = ", ".join(self.models)
        raise BadInput(f"unknown model {name!r}; this server has: {known}", "model")

    def loaded(self, name: str) -> Any | None:
        with self._lock:
            return self._loaded.get(name)

    def check(self, name: str, request: Request) -> Request:
        """The request resolved against the model: by its Pipeline when loaded (refiner rules included), else by
        its manifest (a bundle loaded lazily has no refiner)."""
        pipe = self.loaded(name)
        if pipe is not None:
            return pipe.check_request(request)
        return request.resolve(self.models[name].manifest)

    def pipeline(self, name: str) -> Any:
        """The loaded Pipeline of a model, loading it (and unloading the least recently used) if needed. Engine
        thread only: loads never race a generation."""
        with self._lock:
            pipe = self._loaded.get(name)
            if pipe is not None:
                self._loaded.move_to_end(name)
                return pipe
        while len(self._loaded) >= self.max_loaded:
            with self._lock:
                old, _ = self._loaded.popitem(last=False)
            log.info("unloaded %s (--max-loaded %d)", old, self.max_loaded)
        log.info("loading %s", name)
        pipe = self._load(self.models[name].path)
        with self._lock:
            self._loaded[name] = pipe
        return pipe
