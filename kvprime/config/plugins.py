"""A researcher's own code, without forking kvprime: modules named in the run's ``plugins:`` list (or
published as ``kvprime.plugins`` entry points) are imported before anything is checked, and register their
builders, surrogate sources or analyses as they import.

A plugin is a module name (importable, or a ``.py`` file or a package folder with ``__init__.py`` in one of the
search directories: the current directory and the folders each load is given, a run's ``--config-dir`` /
``hydra.searchpath`` folders; ``mypkg.builders`` names a module inside such a package) or a path to a ``.py`` file.

Nothing is kept between loads but ``sys.modules`` itself: the search directories are an argument of each load, so
two runs in one process (a multirun's jobs) with different config folders each find only their own plugins. A
module file is imported under a name derived from its path (two ``plug.py`` in different folders stay apart), and
a package from a folder is marked with that folder, so a later load whose search directories do not hold it does
not find it.

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
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

ENTRY_POINT_GROUP = "kvprime.plugins"
# Set on a package imported from a folder: the folder, so that only a load searching that folder finds it again.
FOLDER_MARK = "__kvprime_plugin_folder__"


def search_dirs(dirs=()) -> list[Path]:
    """Where a load looks for plugin modules and packages: the current directory, then ``dirs`` (resolved, once)."""
    out: list[Path] = []
    for d in [Path.cwd(), *dirs]:
        p = Path(d).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def _from_file(path: Path, label: str):
    path = path.resolve()
    # A name per file, so two plugins both called plug.py in different folders do not replace each other; the same
    # file named twice (as a module and as a path) is imported once.
    name = f"kvprime_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a spec and a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ConfigError(f"plugins: {label} ({path}) failed while importing: {type(err).__name__}: {err}") from err
    return module


def _package_dir(folder: Path, top: str) -> Path | None:
    """``folder/top`` when it is a package (a folder with ``__init__.py``; a bare folder is not, so a config
    folder such as ``condition/`` never passes for a plugin)."""
    pkg = folder / top
    return pkg if (pkg / "__init__.py").is_file() else None


def _installed_elsewhere(top: str, pkg: Path) -> bool:
    """Whether ``top`` imports from somewhere other than ``pkg`` (an installed package wins, as for modules)."""
    if getattr(sys.modules.get(top), FOLDER_MARK, None) is not None:
        return False  # imported from a plugin folder by an earlier run, not installed
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # a half-imported module in sys.modules: not a usable installed one
        return False
    origin = spec.origin or next(iter(spec.submodule_search_locations or ()), None) if spec else None
    if not origin:
        return False
    return not Path(origin).resolve().is_relative_to(pkg.resolve())


def _from_package(folder: Path, entry: str):
    """Import ``entry`` (``top`` or ``top.sub...``) from the package ``folder/top``, registered under its own
    name so that its imports of itself resolve."""
    top = entry.split(".")[0]
    label = f"{entry!r} (package {folder / top})"
    if top in sys.modules and getattr(sys.modules[top], FOLDER_MARK, None) not in (None, str(folder)):
        _forget(top)  # the package of that name another run found in another folder: this run's is this folder's
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        assert spec is not None and spec.loader is not None  # folder/top/__init__.py exists (_package_dir)
        module = importlib.util.module_from_spec(spec)
        setattr(module, FOLDER_MARK, str(folder))
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


def _from_search_dirs(entry: str, dirs: list[Path]):
    """``entry`` from the first of ``dirs`` that holds it as a package or a module file, else None."""
    top = entry.split(".")[0]
    for d in dirs:
        pkg = _package_dir(d, top)
        if pkg is not None:
            return None if _installed_elsewhere(top, pkg) else _from_package(d, entry)
        path = d / (entry.replace(".", "/") + ".py")
        if path.is_file() and importlib.util.find_spec(top) is None:
            return _from_file(path, repr(entry))
    return None


def load_one(entry: str, dirs=()):
    """Import one plugin (a module already imported is taken from ``sys.modules``) and return the module.
    ``dirs``: the folders to search besides the current directory."""
    where = search_dirs(dirs)
    as_path = Path(entry).expanduser()
    if entry.endswith(".py"):
        candidates = [as_path] if as_path.is_absolute() else [d / as_path for d in where]
        for path in candidates:
            if path.is_file():
                return _from_file(path.resolve(), repr(entry))
        raise ConfigError(f"plugins: the file {entry!r} was not found (looked in {', '.join(map(str, candidates))}).")
    local = _from_search_dirs(entry, where)
    if local is not None:
        return local
    top = entry.split(".")[0]
    try:
        if getattr(sys.modules.get(top), FOLDER_MARK, None) is not None:  # another run's folder, not searched here
            raise ModuleNotFoundError(name=top)
        return importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name and entry.startswith(err.name):
            raise ConfigError(f"plugins: no module named {entry!r} (not importable, and neither "
                              f"{entry.replace('.', '/')}.py nor a package folder {top}/ with __init__.py in "
                              f"{', '.join(map(str, where))}). Accepted: a module or package name, or a path to a "
                              ".py file.") from None
        raise ConfigError(f"plugins: {entry!r} failed while importing: {err}") from err
    except Exception as err:
        raise ConfigError(f"plugins: {entry!r} failed while importing: {type(err).__name__}: {err}") from err


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


def origins(modules: Mapping[str, object]) -> dict[str, str | None]:
    """Where each loaded plugin came from (its file; ``modules`` as ``load_modules`` returns them), recorded in a
    run's plan.json so that ``kvprime report`` in a later process, without the run's --config-dir, imports the same
    files."""
    return {entry: getattr(module, "__file__", None) for entry, module in modules.items()}


def load_modules(entries=(), recorded: Mapping | None = None, *, dirs=()) -> dict[str, object]:
    """Import every installed ``kvprime.plugins`` entry point and each of ``entries`` (from the file ``recorded``
    names for it, when that file is still there; else from the current directory, ``dirs`` or the installed
    modules); returns entry -> module for ``entries``, in their order."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()  # imported once: Python keeps it in sys.modules
        except Exception as err:
            raise ConfigError(f"plugins: the installed entry point {ep.name!r} ({ep.value}) failed while "
                              f"importing: {type(err).__name__}: {err}") from err
    recorded = recorded or {}
    modules = {}
    for entry in map(str, entries or ()):
        origin = recorded.get(entry)
        module = _load_recorded(entry, Path(origin)) if origin and Path(origin).is_file() else None
        modules[entry] = module if module is not None else load_one(entry, dirs)
    return modules


def load(entries=(), recorded: Mapping | None = None, *, dirs=()) -> list[str]:
    """``load_modules``, returning what was loaded: the entry points (``entry point <name>``), then ``entries``."""
    modules = load_modules(entries, recorded, dirs=dirs)
    points = [f"entry point {ep.name}" for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return [*points, *modules]


def _load_recorded(entry: str, origin: Path):
    """``entry`` imported from where a run found it (``origin``), or None where an installed module of that name
    wins."""
    top = entry.split(".")[0]
    folder = _recorded_package(entry, origin)
    if folder is not None:
        return None if _installed_elsewhere(top, folder / top) else _from_package(folder, entry)
    return _from_file(origin, repr(entry)) if importlib.util.find_spec(top) is None else None
