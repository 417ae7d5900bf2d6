"""The one registry (``kvprime.registry``) and what sits on it: duplicate names refused naming both modules, unknown
names answered with the registered ones closest first, nothing imported before the first lookup, installed
``kvprime.plugins`` entry points loaded, and builders that must bring their plan."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
from test_multidoc_builders import engine_for
from test_multidoc_builders import segs as multidoc_segs

from kvprime.builders import BUILDERS, Builder, EncodeRequest, PrimedCache, register_builder
from kvprime.builders.conditions import ConditionSpec, validate
from kvprime.data import LOADERS, OPTIONS, REGISTRY, register_loader
from kvprime.errors import ConfigError
from kvprime.registry import Registry


def write_package(root, name: str, modules: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(f'"""{name}"""\n')
    for module, body in modules.items():
        (root / name / f"{module}.py").write_text(textwrap.dedent(body))


@pytest.fixture()
def widgets(tmp_path, monkeypatch):
    """A registry module and a package of two widget modules in tmp_path, importable, forgotten afterwards."""
    tag = tmp_path.name.replace("-", "_").replace("[", "_").replace("]", "_")
    reg, pkg = f"widget_registry_{tag}", f"widgets_{tag}"
    (tmp_path / f"{reg}.py").write_text(textwrap.dedent(f"""\
        from kvprime.registry import Registry

        WIDGETS = Registry("widget", packages=({pkg!r},), entry_point_group=None)


        def register_widget(name):
            def wrap(fn):
                WIDGETS.register(name, fn)
                return fn
            return wrap
        """))
    body = "from {reg} import register_widget\n\n\n@register_widget({name!r})\ndef {fn}():\n    return {name!r}\n"
    write_package(tmp_path, pkg, {"alpha": body.format(reg=reg, name="alpha", fn="alpha"),
                                  "beta": body.format(reg=reg, name="beta", fn="beta")})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(reg), pkg
    for key in [k for k in sys.modules if k in (reg, pkg) or k.startswith(pkg + ".")]:
        del sys.modules[key]


# ---------------------------------------------------------------- the registry itself

def test_nothing_is_imported_before_the_first_lookup(widgets):
    module, pkg = widgets
    assert pkg not in sys.modules and f"{pkg}.alpha" not in sys.modules

    module.WIDGETS.register("early", len)  # registering is not a lookup: still nothing discovered
    assert f"{pkg}.alpha" not in sys.modules

    assert module.WIDGETS.names() == ["alpha", "beta", "early"]  # every module of the package, none listed by hand
    assert f"{pkg}.alpha" in sys.modules and f"{pkg}.beta" in sys.modules
    assert module.WIDGETS.get("beta")() == "beta" and "alpha" in module.WIDGETS and "gamma" not in module.WIDGETS
    assert [name for name, _ in module.WIDGETS.items()] == ["early", "alpha", "beta"]  # registration order


@pytest.mark.integration
def test_kvprime_registries_import_their_modules_on_first_lookup():
    probe = textwrap.dedent("""\
        import json, sys
        import kvprime.analysis.registry as analyses, kvprime.builders as builders, kvprime.data as data
        watched = ("kvprime.builders.library.full", "kvprime.data.squad", "kvprime.analysis.exp01")
        before = [m for m in watched if m in sys.modules]
        found = ["full" in builders.BUILDERS, "squad_v11" in data.LOADERS, "exp01" in analyses.ANALYSES]
        print(json.dumps({"before": before, "after": [m for m in watched if m in sys.modules], "found": found}))
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(out.stdout)
    assert seen == {"before": [], "after": ["kvprime.builders.library.full", "kvprime.data.squad",
                                            "kvprime.analysis.exp01"], "found": [True, True, True]}


def test_a_taken_name_is_refused_naming_both_modules(widgets, tmp_path):
    module, pkg = widgets
    (tmp_path / pkg / "gamma.py").write_text(textwrap.dedent(f"""\
        from {module.__name__} import register_widget


        @register_widget("alpha")
        def impostor():
            return "not alpha"
        """))
    with pytest.raises(ConfigError) as err:
        module.WIDGETS.names()  # discovery imports gamma, which takes alpha's name
    message = str(err.value)
    assert "widget 'alpha' is registered twice" in message
    assert f"module {pkg}.alpha" in message and f"module {pkg}.gamma" in message and "\n" not in message
    (tmp_path / pkg / "gamma.py").unlink()  # the clash resolved, the next lookup discovers the rest
    sys.modules.pop(f"{pkg}.gamma", None)
    assert module.WIDGETS.get("alpha")() == "alpha" and module.WIDGETS.names() == ["alpha", "beta"]


def test_a_name_taken_before_discovery_is_refused_at_the_first_lookup(widgets):
    module, pkg = widgets

    def alpha():
        return "early"

    module.WIDGETS.register("alpha", alpha)
    for _ in range(2):  # every lookup reports it until one of the two goes
        with pytest.raises(ConfigError, match=rf"'alpha' is registered twice: by .*alpha in module {__name__} and by "
                                              rf"alpha in module {pkg}\.alpha\."):
            module.WIDGETS.names()
    module.WIDGETS.unregister("alpha")  # the failed import left no half module behind: the next lookup imports it
    assert f"{pkg}.alpha" not in sys.modules
    assert module.WIDGETS.names() == ["alpha", "beta"] and module.WIDGETS.get("alpha")() == "alpha"


def test_the_same_definition_imported_again_is_not_a_duplicate(widgets):
    module, pkg = widgets
    first = module.WIDGETS.get("alpha")
    importlib.reload(sys.modules[f"{pkg}.alpha"])  # a second import of the module: a new function object
    again = module.WIDGETS.get("alpha")
    assert again is not first and again() == "alpha"


def test_an_unknown_name_lists_the_registered_ones_closest_first():
    reg = Registry("widget", entry_point_group=None, hint="Register yours with @register_widget.")
    for name in ("full", "joint", "truncate_prefix", "truncate_suffix"):
        reg.register(name, name)
    with pytest.raises(ConfigError) as err:
        reg.get("truncate_sufix")
    assert str(err.value) == ("unknown widget 'truncate_sufix'. Registered widgets: truncate_suffix, truncate_prefix, "
                              "full, joint (closest first). Register yours with @register_widget.")
    with pytest.raises(ConfigError, match=r"Registered widgets: joint, "):
        reg["jont"]
    assert reg.unregister("joint") == "joint" and "joint" not in reg and reg.unregister("joint") is None


def test_entry_points_of_an_installed_distribution_are_loaded_on_first_lookup(tmp_path, monkeypatch):
    """A fake installed distribution: a .dist-info folder with a ``kvprime.plugins`` entry point, on sys.path."""
    tag = tmp_path.name.replace("-", "_").replace("[", "_").replace("]", "_")
    reg_module, plugin = f"ep_registry_{tag}", f"ep_plugin_{tag}"
    (tmp_path / f"{reg_module}.py").write_text("from kvprime.registry import Registry\n\n"
                                               "WIDGETS = Registry('widget')\n")
    (tmp_path / f"{plugin}.py").write_text(f"from {reg_module} import WIDGETS\n\nWIDGETS.register('installed', len)\n")
    dist = tmp_path / "fake_kvprime_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-kvprime-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[kvprime.plugins]\nfake = {plugin}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        widgets = importlib.import_module(reg_module).WIDGETS
        assert plugin not in sys.modules
        assert widgets.names() == ["installed"] and plugin in sys.modules
    finally:
        for key in (reg_module, plugin):
            sys.modules.pop(key, None)


def test_a_broken_entry_point_is_one_paragraph_naming_it(monkeypatch):
    class Broken:
        name, value = "broken", "no_such_module_anywhere:thing"

        def load(self):
            raise ModuleNotFoundError("No module named 'no_such_module_anywhere'")

    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [Broken()] if group == "kvprime.plugins" else [])
    reg = Registry("widget")
    with pytest.raises(ConfigError, match=r"entry point 'broken' \(no_such_module_anywhere:thing\) failed while "
                                          r"importing: ModuleNotFoundError"):
        reg.names()
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    assert reg.names() == []  # a failed load is retried by the next lookup


@pytest.mark.integration
def test_an_entry_point_builder_reaches_the_builder_registry(tmp_path):
    (tmp_path / "ep_builder_plugin.py").write_text(textwrap.dedent("""\
        from kvprime.builders import Builder, register_builder


        @register_builder("from_entry_point")
        class FromEntryPoint(Builder):
            \"\"\"Registered by an installed distribution.\"\"\"

            def plan(self, seg, spec):
                return []

            def build(self, engine, seg, spec):
                raise NotImplementedError
        """))
    dist = tmp_path / "ep_builder_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-builder-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvprime.plugins]\nmine = ep_builder_plugin\n")
    probe = "from kvprime.builders import BUILDERS; print(BUILDERS.get('from_entry_point').doc)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Registered by an installed distribution."


# ---------------------------------------------------------------- builders on the registry

class _Plain(Builder):
    """A builder that encodes the cache ids and keeps them."""

    def plan(self, seg, spec):
        ids = seg.cache_ids
        return [EncodeRequest(ids, tuple(range(len(ids))))]

    def build(self, engine, seg, spec):
        (req,) = self.plan(seg, spec)
        cache = engine.encode(req.ids, req.positions)
        return PrimedCache(cache, list(req.ids), list(req.positions), len(req.ids), ("document",), len(req.ids))


def test_a_builder_without_a_plan_is_refused():
    class NoPlan(Builder):
        """Builds, but never says what it will encode."""

        def build(self, engine, seg, spec):
            raise NotImplementedError

    with pytest.raises(ConfigError) as err:
        register_builder("no_plan")(NoPlan)
    assert "has no plan" in str(err.value) and "a_builder_without_a_plan_is_refused.<locals>.NoPlan" in str(err.value)
    assert "\n" not in str(err.value) and "no_plan" not in BUILDERS

    def build_fn(engine, seg, spec):  # the function form: no place for a plan
        raise NotImplementedError

    with pytest.raises(ConfigError, match="is not a Builder subclass.*plan\\(seg, spec\\)"):
        register_builder("function_form")(build_fn)
    with pytest.raises(ConfigError, match="register_builder takes the name only, got params, roles"):
        register_builder("keywords", params=object, roles={})
    assert "function_form" not in BUILDERS and "keywords" not in BUILDERS


def test_builder_params_must_be_a_dataclass():
    class Loose(_Plain):
        params = dict

    with pytest.raises(ConfigError, match="params must be a dataclass"):
        register_builder("loose")(Loose)


def test_a_builder_under_a_kvprime_name_is_refused_naming_both_modules():
    class Full(_Plain):
        """Another full."""

    with pytest.raises(ConfigError) as err:
        register_builder("full")(Full)
    assert "builder 'full' is registered twice" in str(err.value)
    assert "module kvprime.builders.library.full" in str(err.value) and f"module {__name__}" in str(err.value)
    assert BUILDERS.get("full").doc.startswith("Encode sink+prefix+document+suffix")


def test_a_registered_builder_is_one_object_with_its_declarations():
    @dataclass(frozen=True)
    class Knobs:
        depth: int = 1

    class Declared(_Plain):
        """Declares everything."""

        params = Knobs
        roles = {"prefix": "cut"}
        refuses = {"suffix_template": "it has no place for a suffix"}

        def notes(self, params):
            return f"depth {params.depth}"

    register_builder("declared")(Declared)
    try:
        info = BUILDERS.get("declared")
        assert isinstance(info, Declared) and info.name == "declared" and info.param_names() == ("depth",)
        assert info.doc == "Declares everything." and info.notes(info.make_params({"depth": 3}, "here")) == "depth 3"
        spec = ConditionSpec("d", builder="declared", surrogate="query", prefix_template="{surrogate}",
                             suffix_template=" {surrogate}")
        with pytest.raises(ConfigError, match="builder declared takes no suffix_template.*no place for a suffix"):
            validate(spec)
    finally:
        BUILDERS.unregister("declared")


def test_an_unknown_builder_names_the_condition_and_the_closest_builders():
    with pytest.raises(ConfigError) as err:
        validate(ConditionSpec("t", builder="truncate_prefx"))
    assert str(err.value).startswith("condition 't': unknown builder 'truncate_prefx'. Registered builders: "
                                     "truncate_prefix, truncate_suffix, ")


MULTIDOC_SPECS = [ConditionSpec("joint", builder="joint")] + [
    ConditionSpec(f"{b}_{fix}_{sinks}", builder=b, rope_fix=fix, other_sinks=sinks,
                  **({"surrogate": "query", "prefix_template": "{surrogate}"} if "primed" in b else {}))
    for b in ("independent", "independent_primed", "independent_recompute", "independent_primed_recompute")
    for fix in ("rerotate", "shift") for sinks in ("drop", "keep")]
SINGLE_SPECS = [ConditionSpec("full", builder="full"), ConditionSpec("full_offset", builder="full", position_offset=9),
                ConditionSpec("suffix", builder="truncate_suffix")] + [
    ConditionSpec(f"prefix_{fix}_{offset}", builder="truncate_prefix", rope_fix=fix, position_offset=offset)
    for fix in ("none", "rerotate", "shift") for offset in (0, 9)]


def test_every_kvprime_builder_is_exercised_here():
    own = {name for name, b in BUILDERS.items() if type(b).__module__.startswith("kvprime.builders.library.")}
    assert {s.builder for s in MULTIDOC_SPECS + SINGLE_SPECS} == own


@pytest.mark.parametrize("spec", MULTIDOC_SPECS + SINGLE_SPECS, ids=lambda s: s.name)
def test_every_kvprime_builder_plans_every_encode_it_asks_for(spec):
    """After the plan's encodes ran (batched), building asks the model for nothing more: no builder loses its
    batching to an encode it did not plan."""
    from test_cache_identities import segs as single_segs

    eng = engine_for("llama")
    if spec.builder.startswith(("joint", "independent")):
        s = multidoc_segs(n_prefix=4 if "primed" in spec.builder else 0)
    else:
        s = single_segs(n_prefix=5, n_suffix=3 if spec.builder != "truncate_prefix" else 0)
    requests = eng.plan(spec, s)
    assert requests and all(isinstance(r, EncodeRequest) for r in requests)
    eng.prefill(requests)
    planned = eng.n_encodes
    eng.build(spec, s)
    assert eng.n_encodes == planned


# ---------------------------------------------------------------- dataset loaders on the registry

def test_loaders_register_on_the_registry_and_the_old_mappings_read_it():
    assert {"squad_v11", "msmarco_v11", "jsonl", "exp21_sanity"} <= set(REGISTRY.names())
    assert OPTIONS["jsonl"] == ("path",) and LOADERS["jsonl"] is REGISTRY.get("jsonl").load

    @register_loader("throwaway_loader", options=("root",))
    def throwaway(cfg):
        yield from ()

    try:
        assert OPTIONS["throwaway_loader"] == ("root",) and "throwaway_loader" in LOADERS
        with pytest.raises(ConfigError, match="dataset loader 'throwaway_loader' is registered twice"):
            register_loader("throwaway_loader")(lambda cfg: iter(()))
    finally:
        LOADERS.pop("throwaway_loader")
    assert "throwaway_loader" not in OPTIONS
    with pytest.raises(ConfigError, match=r"unknown dataset loader 'jsonlines'\. Registered dataset loaders: jsonl, "):
        REGISTRY.get("jsonlines")


# ---------------------------------------------------------------- analyses on the registry

def test_an_analysis_under_a_kvprime_name_is_refused_naming_both_modules():
    from kvprime.analysis.registry import ANALYSES, register_analysis

    def exp01(run):
        return {}

    assert "exp01" in ANALYSES  # kvprime's own analyses discovered
    with pytest.raises(ConfigError) as err:
        register_analysis("exp01")(exp01)
    assert "analysis 'exp01' is registered twice" in str(err.value)
    assert "module kvprime.analysis.exp01" in str(err.value) and f"module {__name__}" in str(err.value)
    assert ANALYSES.get("exp01").fn.__module__ == "kvprime.analysis.exp01"
    with pytest.raises(ConfigError, match=r"unknown analysis 'per_pasage'\. Registered analyses: per_passage, "):
        ANALYSES.get("per_pasage")
