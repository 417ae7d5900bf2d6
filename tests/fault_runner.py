"""Run the kvprime CLI with its write points instrumented, and SIGKILL it at the N-th one.

    python tests/fault_runner.py <kill_at> <mode> <event_log> <kvprime arguments...>

Write points: every call of ``kvprime.files.results_io.write_atomic`` (``write_json``/``write_jsonl``, the CSVs,
the report and the figures all go through it), every ``ScoreLog.append`` (one line of ``scores.jsonl``), and a
merge's folder operations (``kvprime.scaleout.merge.rename_dir``: a work folder renamed into place or an old
output renamed aside; ``remove_path``: a leftover or replaced folder removed). Each one is numbered from 1 and
recorded as a JSON line in ``event_log`` (a file outside the run directory), with its kind (atomic, append,
rename, remove), its file and, for an append, its (sample_id, condition). ``kill_at=0`` kills nothing: the run
is only counted. At write point ``kill_at`` the process SIGKILLs itself (no handler, no cleanup can run):

- ``before``: before the write starts;
- ``after``: after the write is complete (renamed into place, the line fsync'ed, the folder moved or removed);
- ``torn``: in the middle of the write: for an append, half of the JSON line is appended to ``scores.jsonl``
  (through a handle of its own), flushed and fsync'ed (a torn last line); for a whole-file write, half of the
  data goes to the same kind of temporary file ``write_atomic`` uses, which is never renamed; a rename has no
  middle (the kernel does it whole), so it is killed before; a removal is killed after half of the folder's
  files are gone.

``python tests/fault_runner.py --serve`` is a fork server for the same: it imports kvprime and its heavy
dependencies once, then reads one JSON request a line on stdin (``{"argv": [...], "cwd": path, "output": path}``
or ``"stdout"`` and ``"stderr"`` paths; optionally ``"env"``: the child's whole environment, ``"code"``: a
``python -c`` program to run with ``argv`` instead of the CLI, and ``"kill_at"``, ``"mode"``, ``"events"``),
forks a child that runs it exactly as above (instrumented only when ``events`` is given), answers
``{"pid": ...}``, waits for it and answers ``{"returncode": ...}`` (minus the signal number for a killed child, as
``subprocess`` does). Every child is a process of its own, killed for real; only the import time (most of a tiny
run's time) is shared.

Used by tests/test_fault_injection.py, tests/test_merge_atomic.py and tests/fixtures/cli.py (every test that
runs the command line).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

MODES = ("before", "after", "torn")


def _install(kill_at: int, mode: str, event_log: Path) -> None:
    import importlib

    from kvprime.files import results_io as rio

    # Modules that did `from .results_io import write_atomic` hold their own reference: import every module of
    # the run path now (lazily imported ones included) and patch the name wherever it is bound.
    for name in ("kvprime.commands.app", "kvprime.pipeline.runner", "kvprime.reporting.finalize",
                 "kvprime.reporting.figures", "kvprime.reporting.report", "kvprime.surrogates.store",
                 "kvprime.scaleout.sweep", "kvprime.scaleout.merge"):
        try:
            importlib.import_module(name)
        except ImportError:  # a module that does not exist (any more) writes nothing
            pass

    real_write_atomic = rio.write_atomic
    real_append = rio.ScoreLog.append
    counter = {"n": 0}

    def record(event: dict) -> int:
        counter["n"] += 1
        event = {"n": counter["n"], **event}
        with open(event_log, "a") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return counter["n"]

    def die(n: int, how: str) -> None:
        with open(event_log, "a") as fh:
            fh.write(json.dumps({"killed": n, "mode": how}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def write_atomic(path, data):
        path = Path(path)
        n = record({"kind": "atomic", "file": str(path)})
        if n == kill_at:
            if mode == "before":
                die(n, mode)
            if mode == "torn":
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                text = data if isinstance(data, (str, bytes)) else "".join(data)  # a page written in pieces
                raw = text if isinstance(text, bytes) else text.encode()
                os.write(fd, raw[:max(1, len(raw) // 2)])
                os.fsync(fd)
                die(n, mode)
        real_write_atomic(path, data)
        if n == kill_at:
            die(n, mode)

    def append(self, row):
        n = record({"kind": "append", "file": str(self.path), "key": [row["sample_id"], row["condition"]]})
        if n == kill_at:
            if mode == "before":
                die(n, mode)
            if mode == "torn":  # through a handle of our own: ScoreLog's internals are not assumed
                line = (rio.dumps(row) + "\n").encode()
                with open(self.path, "ab") as fh:
                    fh.write(line[:len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die(n, mode)
        real_append(self, row)
        if n == kill_at:
            die(n, mode)

    rio.write_atomic = write_atomic
    rio.ScoreLog.append = append
    _install_merge(record, die, kill_at, mode)
    for name, module in list(sys.modules.items()):
        if (name == "kvprime" or name.startswith("kvprime.")) and getattr(module, "write_atomic", None) \
                is real_write_atomic:
            module.write_atomic = write_atomic


def _install_merge(record, die, kill_at: int, mode: str) -> None:
    """Number (and kill at) a merge's folder renames and removals, as ``_install`` does its file writes."""
    try:
        from kvprime.scaleout import merge
    except ImportError:
        return
    real_rename, real_remove = getattr(merge, "rename_dir", None), getattr(merge, "remove_path", None)
    if real_rename is None or real_remove is None:  # a kvprime whose merge has no folder operations
        return

    def rename_dir(src, dst):
        n = record({"kind": "rename", "file": str(dst), "from": str(src)})
        if n == kill_at and mode in ("before", "torn"):
            die(n, mode)
        real_rename(src, dst)
        if n == kill_at:
            die(n, mode)

    def remove_path(path):
        path = Path(path)
        n = record({"kind": "remove", "file": str(path)})
        if n == kill_at and mode == "before":
            die(n, mode)
        if n == kill_at and mode == "torn":
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
            for f in files[:len(files) // 2]:
                f.unlink()
            die(n, mode)
        real_remove(path)
        if n == kill_at:
            die(n, mode)

    merge.rename_dir, merge.remove_path = rename_dir, remove_path


def _cli(args: list[str]) -> int:
    from kvprime.commands import cli

    sys.argv = ["kvprime", *args]
    try:
        cli.main()
    except SystemExit as exc:
        return _status(exc)
    return 0


def _status(exc: SystemExit) -> int:
    """The exit status the interpreter gives for ``exc``: SystemExit("message") prints it and exits 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def _preload() -> None:
    """What every run imports anyway; importing it before forking runs nothing of a run."""
    import kvprime.commands.app  # noqa: F401  (hydra, omegaconf)
    import kvprime.commands.cli  # noqa: F401
    import kvprime.pipeline.runner  # noqa: F401  (torch, transformers)
    import kvprime.reporting.figures  # noqa: F401  (matplotlib)
    import kvprime.reporting.finalize  # noqa: F401  (pandas, scipy via stats)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401
    except ImportError:
        pass


def _child(req: dict) -> None:
    """In the forked child: run one request and leave with its exit code (never return to the server loop)."""
    code = 1
    try:
        paths = {1: req.get("stdout") or req["output"], 2: req.get("stderr") or req["output"]}
        for path in set(paths.values()):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        for fd, path in paths.items():
            # O_APPEND: stdout and stderr may be one file, written through two descriptors
            out = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.dup2(out, fd)
            os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if req.get("env") is not None:
            os.environ.clear()
            os.environ.update(req["env"])
        os.chdir(req["cwd"])
        # as under the console script: neither the current directory nor this file's folder (tests/) is on the path
        sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(__file__).resolve().parent]
        if req.get("events"):
            _install(int(req.get("kill_at") or 0), req.get("mode") or "before", Path(req["events"]))
        code = _program(req["code"], list(req["argv"])) if req.get("code") is not None else _cli(list(req["argv"]))
    except BaseException:  # noqa: BLE001  (a traceback in the output, exit 1, as a fresh process would)
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _program(code: str, args: list[str]) -> int:
    """``python -c <code> <args>``: the program runs as ``__main__`` with ``sys.argv = ["-c", *args]``."""
    sys.argv = ["-c", *args]
    try:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        return _status(exc)
    return 0


def serve() -> None:
    _preload()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(json.dumps({"returncode": code}) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve()
        return
    kill_at, mode, event_log, *args = argv
    if mode not in MODES:
        raise SystemExit(f"fault_runner: mode must be one of {MODES}, not {mode!r}")
    _install(int(kill_at), mode, Path(event_log))
    raise SystemExit(_cli(args))


if __name__ == "__main__":
    main(sys.argv[1:])
