"""Models the app may load, loaded once — and only when a page asks for a computation — and used
one request at a time each: a `HeadModel`'s patched() context is not shared between threads.

Which: the zoo, and local model directories that the runs name or that were given at start-up.
A hub name (which could download gigabytes, or wait half a minute to fail offline) is loadable
only when the app was started with `allow_hub=True` (`headlab app --allow-hub`)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from headlab.errors import HeadlabError
from headlab.model import HeadModel, load_model
from headlab.runs import RunStore


def zoo_models() -> list[str]:
    from headlab import zoo

    # the packaged encoders (zoo.PACKAGED) cannot generate text: the playground offers decoders only
    return [f"zoo:{name}" for name in zoo.available() if name not in zoo.PACKAGED]


def is_local(ref: str) -> bool:
    """A zoo model or an existing local directory (nothing to download)."""
    from pathlib import Path

    return ref.startswith("zoo:") or Path(ref).expanduser().is_dir()


def is_vision(ref: str) -> bool:
    from headlab import zoo

    return ref.startswith("zoo:") and zoo.is_vision_model(ref[4:])


class ModelCache:
    """Lazily loaded models, each with its own lock."""

    def __init__(self, store: RunStore, extra: list[str] | None = None, device: str = "cpu", allow_hub: bool = False) -> None:
        self.store = store
        self.extra = list(extra or [])
        self.device = device
        self.allow_hub = allow_hub
        self._models: dict[str, HeadModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def allowed(self) -> list[str]:
        """Models a page may ask for: those the runs name, the zoo, and any given at start-up —
        local ones only, unless hub names were allowed at start-up."""
        named = [m.get("model", "") for m in self.store.list()]
        refs = [m for m in named + self.extra + zoo_models() if m and isinstance(m, str)]
        return list(dict.fromkeys(r for r in refs if self.allow_hub or is_local(r)))

    def text_models(self) -> list[str]:
        """The allowed models that take a text prompt alone (the playground has no image input)."""
        return [r for r in self.allowed() if not is_vision(r)]

    def why_not(self, ref: str) -> str:
        """Why `ref` is not loadable here (for the message)."""
        if not self.allow_hub and not is_local(ref):
            return (f"model {ref!r} is not a zoo model or a local directory, and hub names are not loaded by this app "
                    "(start it with --allow-hub to allow them)")
        return f"model {ref!r} is neither in the zoo nor named by a run in {self.store.root}; the app only loads those"

    @contextmanager
    def use(self, ref: str, status: Callable[[str], None] | None = None) -> Iterator[HeadModel]:
        """The loaded model `ref`, held exclusively for the body. `status(message)` hears when the
        request waits for another one holding the model, and when the model is being loaded."""
        if ref not in self.allowed():
            raise HeadlabError(self.why_not(ref))
        with self._guard:
            lock = self._locks.setdefault(ref, threading.Lock())
        if not lock.acquire(blocking=False):
            if status is not None:
                status("the model is busy with another request; waiting")
            lock.acquire()
        try:
            if ref not in self._models:
                if status is not None:
                    status(f"loading {ref} (once per server)")
                self._models[ref] = load_model(ref, device=self.device)
            yield self._models[ref]
        finally:
            lock.release()
