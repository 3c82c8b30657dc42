"""Old import paths of modules that moved into subpackages, kept working with a FutureWarning.

Until 0.1 every module sat at the top of the package (``kie_extend.beat``, ``kie_extend.pipeline``,
…). Code and settings that name one still import it: a finder at the end of ``sys.meta_path``
answers ``kie_extend.<old name>`` with the module at its new place (the same module object, so
``kie_extend.beat.TickScheduler is kie_extend.admission.beat.TickScheduler``) and warns once per
name. Four old names are now packages of their own and are not aliased: ``kie_extend.store``,
``kie_extend.infra``, ``kie_extend.admission`` and ``kie_extend.cli`` (its entry point
``kie_extend.cli:main`` stays). docs/layout.md has the whole map.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

#: ``old module name (under kie_extend.)`` -> ``new dotted path (under kie_extend.)``.
MOVED: dict[str, str] = {
    "actions": "jobs.actions",
    "batch_cli": "cli.batch",
    "batches": "jobs.batches",
    "beat": "admission.beat",
    "breaker": "admission.breaker",
    "cli_errors": "cli.errors",
    "client": "provider.client",
    "client_jobs": "provider.jobs_route",
    "consumer": "infra.consumer",
    "delivery": "handlers.delivery",
    "demo": "cli.demo",
    "dev": "cli.dev",
    "devstack": "cli.devstack",
    "embedded": "infra.embedded",
    "endpoints": "infra.endpoints",
    "events": "jobs.events",
    "fileio": "infra.fileio",
    "gates": "admission.gates",
    "idempotency": "jobs.idempotency",
    "ids": "jobs.ids",
    "infra_check": "infra.check",
    "intake": "jobs.intake",
    "invariants": "store.invariants",
    "jsontext": "infra.jsontext",
    "keys": "store.keys",
    "listing": "jobs.listing",
    "logs": "infra.logs",
    "lua": "store.lua",
    "metrics": "infra.metrics",
    "models": "jobs.request",
    "pipeline": "jobs.pipeline",
    "preflight": "infra.preflight",
    "probe": "provider.audio_probe",
    "reach": "admission.reach",
    "runtime": "infra.runtime",
    "scheduler": "admission.tick",
    "states": "jobs.states",
    "transport": "infra.transport",
    "uploads": "provider.uploads",
    "urlcheck": "provider.urlguard",
}


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new place."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there (the old name goes away in a "
                      "later release)", FutureWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self.real_spec = module.__spec__  # the import system overwrites it with the alias's spec next
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module at the new place is already executed): only give the module its
        own spec back, so ``importlib.reload`` and ``__spec__.name`` keep naming the new place."""
        module.__spec__ = self.real_spec


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds ``kie_extend.<old name>`` for every name in :data:`MOVED`, nothing else."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "kie_extend" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"kie_extend.{MOVED[name]}"))


def install() -> None:
    """Append the finder to ``sys.meta_path`` once (real modules are always found first)."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
