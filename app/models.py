"""Models the app may load (the zoo, and the models its runs name), loaded once and used one
request at a time each: a `HeadModel`'s patched() context is not shared between threads."""

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


class ModelCache:
    """Lazily loaded models, each with its own lock."""

    def __init__(self, store: RunStore, extra: list[str] | None = None, device: str = "cpu") -> None:
        self.store = store
        self.extra = list(extra or [])
        self.device = device
        self._models: dict[str, HeadModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def allowed(self) -> list[str]:
        """Models a page may ask for: those the runs name, the zoo, and any given at start-up."""
        named = [m.get("model", "") for m in self.store.list()]
        return list(dict.fromkeys([m for m in named + self.extra + zoo_models() if m]))

    @contextmanager
    def use(self, ref: str, status: Callable[[str], None] | None = None) -> Iterator[HeadModel]:
        """The loaded model `ref`, held exclusively for the body. `status(message)` hears when the
        request waits for another one holding the model, and when the model is being loaded."""
        if ref not in self.allowed():
            raise HeadlabError(f"model {ref!r} is neither in the zoo nor named by a run in {self.store.root}; "
                               "the app only loads those")
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
