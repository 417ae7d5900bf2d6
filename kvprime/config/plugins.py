"""A researcher's own code, without forking kvprime: modules named in the run's ``plugins:`` list (or
published as ``kvprime.plugins`` entry points) are imported before anything is checked, and register their
builders, surrogate sources or analyses as they import.

A plugin is a module name (importable, or a ``.py`` file or a package folder with ``__init__.py`` in one of the
search directories: the current directory and the folders given with ``--config-dir`` / ``hydra.searchpath``;
``mypkg.builders`` names a module inside such a package) or a path to a ``.py`` file.

A package is imported under its own name with the standard path finder limited to the one folder that holds
it, so its relative and absolute imports of itself work as if it were installed, while nothing else in the
user's folders becomes importable (``sys.path`` is not touched).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from ..errors import ConfigError

ENTRY_POINT_GROUP = "kvprime.plugins"
_search_dirs: list[Path] = []
_loaded: dict[str, object] = {}


def add_search_dirs(dirs) -> None:
    """Folders to look for plugin modules and packages in besides the current directory (the run's config folders)."""
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


def _package_dir(folder: Path, top: str) -> Path | None:
    """``folder/top`` when it is a package (a folder with ``__init__.py``; a bare folder is not, so a config
    folder such as ``condition/`` never passes for a plugin)."""
    pkg = folder / top
    return pkg if (pkg / "__init__.py").is_file() else None


def _installed_elsewhere(top: str, pkg: Path) -> bool:
    """Whether ``top`` imports from somewhere other than ``pkg`` (an installed package wins, as for modules)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # a half-imported module in sys.modules: not a usable installed one
        return False
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or ()), None))
    return bool(origin) and not Path(origin).resolve().is_relative_to(pkg.resolve())


def _from_package(folder: Path, entry: str):
    """Import ``entry`` (``top`` or ``top.sub...``) from the package ``folder/top``, registered under its own
    name so that its imports of itself resolve."""
    top = entry.split(".")[0]
    label = f"{entry!r} (package {folder / top})"
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            _forget(top)
            raise ConfigError(f"plugins: {label} failed while importing: {type(err).__name__}: {err}") from err
    try:
        return importlib.import_module(entry)  # submodules are found through the package's own __path__
    except ModuleNotFoundError as err:
        if err.name and entry.startswith(err.name):
            raise ConfigError(f"plugins: no module named {entry!r} in the package {folder / top} (looked for "
                              f"{folder.joinpath(*entry.split('.'))}.py). Accepted: the package's name or a "
                              "dotted name of a module inside it.") from None
        raise ConfigError(f"plugins: {label} failed while importing: {err}") from err
    except Exception as err:
        _forget(entry)
        raise ConfigError(f"plugins: {label} failed while importing: {type(err).__name__}: {err}") from err


def _forget(name: str) -> None:
    """Drop a failed import and its submodules, so that a corrected plugin can be imported again."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        sys.modules.pop(key, None)


def _from_search_dirs(entry: str):
    """``entry`` from the first search directory that holds it as a package or a module file, else None."""
    top = entry.split(".")[0]
    for d in [Path.cwd(), *_search_dirs]:
        pkg = _package_dir(d, top)
        if pkg is not None:
            return None if _installed_elsewhere(top, pkg) else _from_package(d, entry)
        path = d / (entry.replace(".", "/") + ".py")
        if path.is_file() and importlib.util.find_spec(top) is None:
            return _from_file(path, repr(entry))
    return None


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
    local = _from_search_dirs(entry)
    if local is not None:
        _loaded[entry] = local
        return local
    try:
        _loaded[entry] = importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name and entry.startswith(err.name):
            top = entry.split(".")[0]
            raise ConfigError(f"plugins: no module named {entry!r} (not importable, and neither "
                              f"{entry.replace('.', '/')}.py nor a package folder {top}/ with __init__.py in "
                              f"{', '.join(str(d) for d in [Path.cwd(), *_search_dirs])}). Accepted: a module "
                              "or package name, or a path to a .py file.") from None
        raise ConfigError(f"plugins: {entry!r} failed while importing: {err}") from err
    except Exception as err:
        raise ConfigError(f"plugins: {entry!r} failed while importing: {type(err).__name__}: {err}") from err
    return _loaded[entry]


def _recorded_package(entry: str, origin: Path) -> Path | None:
    """The folder that held ``entry``'s package when a run imported it from ``origin`` (its ``__init__.py`` or
    module file), if ``origin`` is still such a file there; None for a plugin that was a single module."""
    parts = entry.split(".")
    depth = len(parts) if origin.name == "__init__.py" else len(parts) - 1
    if depth >= len(origin.parents):
        return None
    folder = origin.parents[depth]
    expected = folder.joinpath(*parts)
    if origin not in (expected / "__init__.py", expected.with_name(parts[-1] + ".py")):
        return None
    return folder if _package_dir(folder, parts[0]) is not None else None


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
        if entry not in _loaded and origin and Path(origin).is_file():
            _load_recorded(entry, Path(origin))
        load_one(entry)
        done.append(entry)
    return done


def _load_recorded(entry: str, origin: Path) -> None:
    """Import ``entry`` from where a run found it (``origin``), unless an installed module of that name wins."""
    top = entry.split(".")[0]
    folder = _recorded_package(entry, origin)
    if folder is not None:
        if not _installed_elsewhere(top, folder / top):
            _loaded[entry] = _from_package(folder, entry)
    elif importlib.util.find_spec(top) is None:
        _loaded[entry] = _from_file(origin, repr(entry))
