"""Every command the documentation shows is one that exists: each `kvprime ...` and `make ...` line of a fenced code
block in README.md and docs/*.md names a real sub-command (with options it declares) or Makefile target (with
variables the Makefile reads), and the Hydra overrides it passes compose with kvprime's own compose helper, in
process and without a model. Commands in inline code are checked for their sub-command, options and target; every
command of `kvprime --help` is shown somewhere in the docs."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from kvprime.commands.cli import app
from kvprime.config.compose import compose, pop_arg
from kvprime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
INLINE = re.compile(r"`((?:kvprime|make) [^`]+)`")
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", flags=re.S)
# Options Hydra itself reads on a pass-through command (kvprime run -m, --cfg job, --config-dir <dir>), with how
# many arguments each takes.
HYDRA_FLAGS = {"-m": 0, "--multirun": 0, "--cfg": 1, "-c": 1, "--config-dir": 1, "-cd": 1, "--info": 0,
               "--resolve": 0}
# A command's own key=value arguments, taken before the rest is composed (kvprime.config.compose.pop_arg).
OWN_ARGS = {("inspect",): ("sample", "conditions"), ("walkthrough",): ("sample",)}
# Makefile variables that stand for an override of the kvprime command a target runs.
MAKE_OVERRIDES = {"MODEL": "model", "DATASET": "dataset", "N": "dataset.n_samples", "WALK_N": "dataset.n_samples",
                  "MULTIDOC_N": "dataset.n_samples"}


@dataclass(frozen=True)
class Shown:
    page: str
    line: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}: {self.line}"


def _page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_commands() -> list[Shown]:
    """Each `kvprime ...` / `make ...` line of a fenced block (its shell comment dropped)."""
    found = []
    for page in PAGES:
        for _lang, body in FENCE.findall(page.read_text()):
            for line in body.splitlines():
                line = line.strip()
                if line.startswith(("kvprime ", "make ")) or line in ("kvprime", "make"):
                    found.append(Shown(_page_name(page), line, tuple(shlex.split(line, comments=True))))
    return found


def inline_commands() -> list[Shown]:
    """Each `kvprime ...` / `make ...` inline code span outside the fenced blocks."""
    found = []
    for page in PAGES:
        prose = FENCE.sub("", page.read_text())
        for span in INLINE.findall(prose):
            span = " ".join(span.split())
            # A placeholder is one word (`<an empty folder>`); optional parts (`[--power 0.8]`) are words too.
            words = re.sub(r"<[^<>]*>", lambda m: m.group(0).replace(" ", "_"), span)
            found.append(Shown(_page_name(page), span, tuple(words.replace("[", " ").replace("]", " ").split())))
    return found


def example_folders(tmp: Path) -> None:
    """The files the docs print (`<!-- example: <path> -->` blocks, and YAML blocks whose first line names their
    place, `# <folder>/experiment/x.yaml`) written under ``tmp``, so `--config-dir <folder>` composes as shown."""
    for page in PAGES:
        text = page.read_text()
        files = dict(EXAMPLE.findall(text))
        for _lang, body in FENCE.findall(text):
            first = body.splitlines()[0] if body.strip() else ""
            if re.fullmatch(r"# <folder>/\S+\.yaml", first):
                files[first[2:]] = body
        for rel, body in files.items():
            path = tmp / rel.replace("<folder>", "folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)


def _cli():
    """kvprime's command tree as Typer builds it (Typer's own click: groups are told apart by their commands)."""
    return typer.main.get_command(app)


def _is_group(cmd) -> bool:
    return isinstance(getattr(cmd, "commands", None), dict)


def _resolve(argv: tuple[str, ...]) -> tuple[tuple[str, ...], object, list[str]]:
    """(the sub-command's path, its click command, the remaining arguments) of ``kvprime <argv>``."""
    cmd, path, rest = _cli(), (), list(argv)
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"`kvprime {' '.join(path + (name,))}` is not a command: {sorted(cmd.commands)}"
        cmd, path = cmd.commands[name], path + (name,)
    return path, cmd, rest


def _options(cmd) -> set[str]:
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}


def _passthrough(cmd) -> bool:
    return bool(cmd.context_settings.get("allow_extra_args"))


def _split_hydra(cmd, rest: list[str], shown: Shown) -> tuple[list[str], str | None]:
    """(the Hydra overrides, the --config-dir folder) of a pass-through command's arguments; every other option must
    be the command's own."""
    overrides, config_dir, args = [], None, list(rest)
    while args:
        arg = args.pop(0)
        if arg in HYDRA_FLAGS:
            taken = [args.pop(0) for _ in range(HYDRA_FLAGS[arg])]
            if arg in ("--config-dir", "-cd"):
                config_dir = taken[0]
        elif arg.startswith("-"):
            assert arg.split("=", 1)[0] in _options(cmd), f"{shown}: {arg} is no option of the command"
        else:
            overrides.append(arg)
    return overrides, config_dir


def _variants(overrides: list[str]) -> list[list[str]]:
    """One override list per value of every sweep (`seed=1,2,3`), the other sweeps at their first value: each value a
    multirun would compose is composed once."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts, sweeps = [], []
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            firsts.append(f"{o.get_key_element()}={values[0]}")
            sweeps += [(i, f"{o.get_key_element()}={v}") for v in values[1:]]
        else:
            firsts.append(o.input_line)
    return [firsts] + [firsts[:i] + [alt] + firsts[i + 1:] for i, alt in sweeps]


def _compose_all(overrides: list[str], config_dir: str | None, folders: Path, shown: Shown) -> None:
    extra = []
    if config_dir is not None:
        where = folders / config_dir.replace("<folder>", "folder")
        assert where.is_dir(), f"{shown}: --config-dir {config_dir} is not a folder the docs print"
        extra = [f"hydra.searchpath=[file://{where}]"]
    for variant in _variants(overrides):
        compose([*variant, *extra])


def _makefile() -> tuple[set[str], str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, flags=re.M))
    return targets, text


def _check_make(shown: Shown, compose_overrides: bool) -> None:
    targets, text = _makefile()
    args = list(shown.argv[1:])
    variables = [a for a in args if "=" in a]
    goals = [a for a in args if "=" not in a]
    assert goals, f"{shown}: no target"
    for goal in goals:
        assert fnmatch.filter(targets, goal), f"{shown}: the Makefile has no target {goal!r}"
    overrides = []
    for assignment in variables:
        name, value = assignment.split("=", 1)
        assert re.search(rf"\$[({{]{name}[)}}]", text), f"{shown}: the Makefile reads no variable {name}"
        if name == "ARGS":
            overrides += shlex.split(value)
        elif name in MAKE_OVERRIDES:
            overrides.append(f"{MAKE_OVERRIDES[name]}={value}")
    if compose_overrides and overrides:
        compose(overrides)


def _leaves(group, path=()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out += _leaves(cmd, path + (name,)) if _is_group(cmd) else [path + (name,)]
    return out


def help_examples() -> list[Shown]:
    """The example lines of each command's `--help` (`kvprime run -m seed=1,2,3  # a Hydra multirun`), optional
    parts in brackets (`[overrides]`) left out: the help and the docs are held to the same check."""
    found = []
    for path in _leaves(_cli()):
        cmd = _cli()
        for name in path:
            cmd = cmd.commands[name]
        for line in (cmd.help or "").splitlines():
            line = line.strip()
            if line.startswith("kvprime "):
                words = re.sub(r"\s\[[^\]]*\]", "", line)
                found.append(Shown(f"kvprime {' '.join(path)} --help", line, tuple(shlex.split(words, comments=True))))
    return found


FENCED = fenced_commands()
INLINE_SHOWN = inline_commands()


def test_the_docs_show_commands():
    """The extraction finds what the pages print (a parser that finds nothing would pass everything)."""
    lines = {s.line for s in FENCED}
    assert "make run     # exp21 on the packaged SmolLM2-135M-Instruct + 50 SQuAD v1.1 dev samples (CPU; ~1 min on 2 " \
           "cores)" in lines
    assert any(s.argv[:2] == ("kvprime", "report") for s in FENCED)
    assert any(s.argv[:3] == ("kvprime", "run", "-m") for s in FENCED)
    assert any("--config-dir" in s.argv for s in FENCED)
    assert len(FENCED) >= 40 and len(INLINE_SHOWN) >= 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs_examples")
    example_folders(root)
    return root


@pytest.mark.parametrize("shown", FENCED + help_examples(), ids=str)
def test_a_fenced_command_exists_and_its_overrides_compose(shown, folders):
    if shown.argv[0] == "make":
        _check_make(shown, compose_overrides=True)
        return
    path, cmd, rest = _resolve(shown.argv[1:])
    assert path and not _is_group(cmd), f"{shown}: `kvprime {' '.join(path)}` needs a sub-command"
    if not _passthrough(cmd):
        if path == ("bench-scale",):  # its trailing arguments are overrides for every run
            rest = [a for a in rest if "=" not in a]
        try:  # parses as `kvprime` would: options, their types, the arguments
            cmd.make_context(" ".join(path), list(rest))
        except Exception as err:  # Typer's click's UsageError and BadParameter
            raise AssertionError(f"{shown}: {err}") from err
        return
    for key in OWN_ARGS.get(path, ()):
        pop_arg(rest, key)
    overrides, config_dir = _split_hydra(cmd, rest, shown)
    _compose_all(overrides, config_dir, folders, shown)


@pytest.mark.parametrize("shown", INLINE_SHOWN, ids=str)
def test_an_inline_command_names_a_real_command_option_or_target(shown):
    if shown.argv[0] == "make":
        _check_make(shown, compose_overrides=False)
        return
    _path, cmd, rest = _resolve(shown.argv[1:])
    if _is_group(cmd):
        return  # `kvprime surrogates ...` named in prose as a family
    for arg in rest:
        if arg.startswith("--") and arg not in HYDRA_FLAGS:
            assert arg.split("=", 1)[0] in _options(cmd), f"{shown}: {arg} is no option of the command"


def test_every_command_of_kvprime_help_is_shown_in_the_docs():
    shown = {s.argv[1:1 + n] for s in FENCED + INLINE_SHOWN if s.argv[0] == "kvprime" for n in (1, 2)}
    missing = [" ".join(p) for p in _leaves(_cli()) if p not in shown]
    assert not missing, f"kvprime commands no page shows: {missing}"


def test_a_broken_command_is_caught(folders):
    """The checks can fail: an unknown sub-command, an unknown option, an override that does not compose, a missing
    make target."""
    bad = [Shown("t", "kvprime rnu", ("kvprime", "rnu")),
           Shown("t", "kvprime power x --efect 1", ("kvprime", "power", "x", "--efect", "1")),
           Shown("t", "kvprime run model=no_such_model", ("kvprime", "run", "model=no_such_model")),
           Shown("t", "kvprime run -m seed=1,abc", ("kvprime", "run", "-m", "seed=1,abc")),
           Shown("t", "make reproduce-exp99", ("make", "reproduce-exp99")),
           Shown("t", "make run ARGS=dataset.n_sample=3", ("make", "run", "ARGS=dataset.n_sample=3"))]
    for shown in bad:
        with pytest.raises((AssertionError, ConfigError, HydraException)):
            test_a_fenced_command_exists_and_its_overrides_compose(shown, folders)
