"""A researcher's own code, without forking kvprime: modules named in the run's ``plugins:`` list (or
published as ``kvprime.plugins`` entry points) are imported before anything is checked, and register their
builders, surrogate sources or analyses as they import.

A plugin is a module name (importable, or a ``.py`` file in one of the search directories: the current
directory and the folders given with ``--config-dir`` / ``hydra.searchpath``) or a path to a ``.py`` file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from ..errors import ConfigError

ENTRY_POINT_GROUP = "kvprime.plugins"
_search_dirs: list[Path] = []
_loaded: dict[str, object] = {}


def add_search_dirs(dirs) -> None:
    """Folders to look for plugin modules in besides the current directory (the run's config folders)."""
    for d in dirs:
        p = Path(d).expanduser().resolve()
        if p not in _search_dirs:
            _search_dirs.append(p)


def _from_file(path: Path, label: str):
    path = path.resolve()
    if str(path) in _loaded:  # the same file named twice (as a module and as a path): imported once
        return _loaded[str(path)]
    # A name per file, so two plugins both called plug.py in different folders do not replace each other.
    name = f"kvprime_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ConfigError(f"plugins: {label} ({path}) failed while importing: {type(err).__name__}: {err}") from err
    _loaded[str(path)] = module
    return module


def load_one(entry: str):
    """Import one plugin (once per process) and return the module."""
    if entry in _loaded:
        return _loaded[entry]
    as_path = Path(entry).expanduser()
    if entry.endswith(".py"):
        candidates = [as_path] if as_path.is_absolute() else [Path.cwd() / as_path] + [d / as_path
                                                                                       for d in _search_dirs]
        for path in candidates:
            if path.is_file():
                _loaded[entry] = _from_file(path.resolve(), repr(entry))
                return _loaded[entry]
        raise ConfigError(f"plugins: the file {entry!r} was not found (looked in {', '.join(map(str, candidates))}).")
    for d in [Path.cwd(), *_search_dirs]:
        path = d / (entry.replace(".", "/") + ".py")
        if path.is_file() and importlib.util.find_spec(entry.split(".")[0]) is None:
            _loaded[entry] = _from_file(path, repr(entry))
            return _loaded[entry]
    try:
        _loaded[entry] = importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name and entry.startswith(err.name):
            raise ConfigError(f"plugins: no module named {entry!r} (not importable, and no {entry}.py in "
                              f"{', '.join(str(d) for d in [Path.cwd(), *_search_dirs])}). Accepted: a module "
                              "name or a path to a .py file.") from None
        raise ConfigError(f"plugins: {entry!r} failed while importing: {err}") from err
    except Exception as err:
        raise ConfigError(f"plugins: {entry!r} failed while importing: {type(err).__name__}: {err}") from err
    return _loaded[entry]


def origins(entries=()) -> dict[str, str | None]:
    """Where each loaded plugin came from (its file), recorded in a run's plan.json so that ``kvprime report``
    in a later process, without the run's --config-dir, imports the same files."""
    return {str(e): getattr(_loaded.get(str(e)), "__file__", None) for e in entries or ()}


def load(entries=(), recorded: dict | None = None) -> list[str]:
    """Import every installed ``kvprime.plugins`` entry point and each of ``entries`` (from the file
    ``recorded`` names for it, when that file is still there); returns what was loaded."""
    recorded = recorded or {}
    done = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if f"entry point {ep.name}" not in _loaded:
            try:
                _loaded[f"entry point {ep.name}"] = ep.load()
            except Exception as err:
                raise ConfigError(f"plugins: the installed entry point {ep.name!r} ({ep.value}) failed while "
                                  f"importing: {type(err).__name__}: {err}") from err
        done.append(f"entry point {ep.name}")
    for entry in entries or ():
        entry = str(entry)
        origin = recorded.get(entry)
        if entry not in _loaded and origin and Path(origin).is_file() and importlib.util.find_spec(
                entry.split(".")[0]) is None:
            _loaded[entry] = _from_file(Path(origin), repr(entry))
        load_one(entry)
        done.append(entry)
    return done
