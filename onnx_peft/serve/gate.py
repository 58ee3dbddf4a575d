"""Per-adapter count of accepted requests, so an unload waits for every request that chose
the adapter (queued ones included), and new requests for it answer 404 meanwhile.

``AdapterSession.unload_adapter`` already waits for runs in flight; a request waiting in the
batcher's queue is not a run yet, so the server counts its own requests first.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable


class UnknownAdapter(LookupError):
    """``name`` is not loaded (or is being unloaded); ``loaded`` lists the names that are."""

    def __init__(self, name: str, loaded: list[str]):
        super().__init__(f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'}; "
                         "'base' runs the model without one)")
        self.name, self.loaded = name, loaded


class AdapterGate:
    """``async with gate.use(name)`` around a request; ``await gate.drain(name)`` before unloading."""

    def __init__(self, loaded: Callable[[], list[str]]):
        self._loaded = loaded
        self._in_use: Counter[str] = Counter()
        self._draining: set[str] = set()
        self._changed = asyncio.Condition()

    def names(self) -> list[str]:
        return [n for n in self._loaded() if n not in self._draining]

    def check(self, name: str | None) -> None:
        """Raise UnknownAdapter unless ``name`` is None (the base) or loaded and not draining."""
        if name is not None and name not in self.names():
            raise UnknownAdapter(name, self.names())

    def use(self, name: str | None) -> _Use:
        self.check(name)
        return _Use(self, name)

    async def drain(self, name: str) -> None:
        """Refuse new requests for ``name`` and wait until its accepted ones are answered."""
        if name not in self.names():
            raise UnknownAdapter(name, self.names())
        self._draining.add(name)
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_use[name] == 0)

    async def drained(self, name: str) -> None:
        """``name`` is unloaded (or its unload failed): stop refusing it, wake :meth:`wait_gone`."""
        self._draining.discard(name)
        async with self._changed:
            self._changed.notify_all()

    async def wait_gone(self, name: str) -> None:
        """Wait while ``name`` is being drained (a reload of it must wait for the unload)."""
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._draining)


class _Use:
    def __init__(self, gate: AdapterGate, name: str | None):
        self.gate, self.name = gate, name
        if name is not None:
            gate._in_use[name] += 1

    async def __aenter__(self) -> _Use:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.release()

    async def release(self) -> None:
        if self.name is None:
            return
        self.gate._in_use[self.name] -= 1
        self.name = None
        async with self.gate._changed:
            self.gate._changed.notify_all()
