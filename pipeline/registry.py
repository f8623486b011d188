"""Plugin registries: a source kind, a detector backend or a transport is one module.

A :class:`Registry` maps a key (``kind: file``, ``backend: mediapipe``) to a
:class:`Plugin`: the plugin's own pydantic settings model and the factory that
builds it. Plugin modules register themselves when imported::

    SOURCES.add("file", FileSettings, FileSource)

and the registry finds them: on first use it imports every module of its
``package`` (``pipeline.sources``; modules whose name starts with ``_`` are
helpers and are skipped), then the modules named by the entry-point group
(``posewire.sources``) of installed distributions, then the modules listed in
``$POSEWIRE_PLUGINS`` (comma-separated module names, importable from
``sys.path``). So adding a plugin is adding one module; a test may also
register a toy plugin from its own module, after which configurations may name
it like any built-in one.

Stage processes are *spawned*: they import nothing of their parent, so a plugin
registered only by an import in the parent is unknown there. Two ways reach
them: an installed distribution's entry point, or ``$POSEWIRE_PLUGINS``, which
spawned children inherit with the environment (``POSEWIRE_PLUGINS=tests.toy_plugin
python -m pipeline run.yaml``). (A child also imports a settings model's module
when it unpickles the validated configuration, which registers that module's
plugins as a side effect; do not rely on it alone.)

The registries live in the bottom layer (beside the configuration, which
validates each section with the settings model its key selects); discovery
imports plugin packages by name, so nothing in the bottom layer imports the
plugins statically.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pipeline.errors import RegistryError

F = TypeVar("F", bound=Callable[..., Any])

PLUGINS_ENV = "POSEWIRE_PLUGINS"
"""Comma-separated modules every registry imports on discovery (plugins outside packages)."""


@dataclass(frozen=True)
class Plugin(Generic[F]):
    """One registered plugin."""

    key: str
    """The value of the discriminating config field (``kind``, ``backend``)."""
    settings: type[Any]
    """Its pydantic settings model (a subclass of the registry's base model)."""
    factory: F
    """Builds the plugin from its validated settings (usually the class itself)."""
    module: str
    """The module that registered it (for messages)."""


class Registry(Generic[F]):
    """Plugins of one kind, by key, discovered from a package and an entry-point group."""

    def __init__(self, what: str, *, package: str, entry_points: str | None = None) -> None:
        self.what = what
        """What a plugin is, for messages: ``source kind``, ``detector backend``."""
        self.package = package
        self.entry_points = entry_points
        self._plugins: dict[str, Plugin[F]] = {}
        self._discovered = False
        self._lock = threading.RLock()
        self.generation = 0
        """Incremented on every registration (caches built from the registry check it)."""

    def add(self, key: str, settings: type[Any], factory: F) -> Plugin[F]:
        """Register ``factory`` under ``key`` with its settings model; returns the plugin."""
        module = getattr(factory, "__module__", "?")
        with self._lock:
            old = self._plugins.get(key)
            if old is not None and old.module != module:
                raise RegistryError(
                    f"{self.what} {key!r} is registered twice: by {old.module} and by {module}"
                )
            plugin = Plugin(key, settings, factory, module)
            self._plugins[key] = plugin
            self.generation += 1
            return plugin

    def remove(self, key: str) -> None:
        """Forget a plugin (tests that register toys clean up with this)."""
        with self._lock:
            if self._plugins.pop(key, None) is not None:
                self.generation += 1

    def discover(self) -> None:
        """Import the plugin package's modules and the entry points, once."""
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{self.package}."):
                if not info.name.rpartition(".")[2].startswith("_"):
                    importlib.import_module(info.name)
            if self.entry_points:
                for ep in importlib.metadata.entry_points(group=self.entry_points):
                    ep.load()
            for name in os.environ.get(PLUGINS_ENV, "").split(","):
                if name.strip():
                    importlib.import_module(name.strip())

    def get(self, key: str) -> Plugin[F]:
        """The plugin registered under ``key``; :class:`RegistryError` naming the known keys."""
        self.discover()
        try:
            return self._plugins[key]
        except KeyError:
            raise RegistryError(
                f"unknown {self.what} {key!r}; known: {', '.join(sorted(self._plugins))}"
            ) from None

    def keys(self) -> list[str]:
        self.discover()
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[Plugin[F]]:
        self.discover()
        return iter(sorted(self._plugins.values(), key=lambda p: p.key))

    def __contains__(self, key: object) -> bool:
        self.discover()
        return key in self._plugins
