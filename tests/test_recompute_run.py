"""experiment=blend end to end on the tiny random model (n=4): every arm scored, the recompute arms' caches built by
the recompute builders with the ratio or k the experiment sets, the named comparisons and the cost table written."""

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_multidoc_run import _data

from kvprime.config.compose import compose
from kvprime.files.results_io import read_jsonl
from kvprime.pipeline import runner

ARMS = [f"{b}_{a}" for b in ("bare", "gen") for a in ("dev05", "dev15", "dev30", "first16", "first32", "rand15")]


def overrides(tmp_path, *extra):
    return ["experiment=blend", "model=tiny_random_llama", "dataset=jsonl", f"dataset.path={_data(tmp_path, n=4)}",
            "stats.n_boot=1000", "progress=false", "generation.model=null", "generation.max_new_tokens=6",
            f"generation.store={tmp_path / 'store'}", *extra]


def test_the_experiment_declares_every_arm_with_its_share(tmp_path):
    cfg = compose(overrides(tmp_path))
    conds = cfg["conditions"]
    assert set(conds) == {"joint", "independent", "primed_query", "primed_generated", "primed_random", *ARMS}
    assert [conds[f"bare_dev{r}"]["ratio"] for r in ("05", "15", "30")] == [0.05, 0.15, 0.30]
    assert conds["gen_first32"]["k"] == 32 and conds["gen_first16"]["rule"] == "first_k"
    assert conds["gen_rand15"]["builder"] == "independent_primed_recompute"
    assert conds["bare_rand15"]["builder"] == "independent_recompute"
    assert len(cfg["experiment"]["comparisons"]) == 12 + 6 + 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend")
    out = tmp / "run"
    runner.run_experiment(compose(overrides(tmp)), out)
    return out


def test_every_arm_is_scored_and_the_comparisons_are_written(run_dir):
    scores = read_jsonl(run_dir / "scores.jsonl")
    names = {r["condition"] for r in scores}
    assert names == {"joint", "independent", "primed_query", "primed_generated", "primed_random", *ARMS}
    by = {(r["sample_id"], r["condition"]): r for r in scores}
    for sid in {r["sample_id"] for r in scores}:
        # a recompute arm's cache is its base's: the same entries and the same indexing work
        assert by[(sid, "bare_dev15")]["cache_len"] == by[(sid, "independent")]["cache_len"]
        assert by[(sid, "bare_dev15")]["encoded_tokens"] == by[(sid, "independent")]["encoded_tokens"]
        assert by[(sid, "gen_dev15")]["encoded_tokens"] == by[(sid, "primed_generated")]["encoded_tokens"]
        assert by[(sid, "bare_first32")]["nll"] != by[(sid, "independent")]["nll"]
    results = json.loads((run_dir / "results.json").read_text())
    done = {c["name"] for c in results["comparisons"]}
    assert "bare_dev15 vs joint: does it reach parity?" in done
    assert "gen_dev15 vs bare_dev15: does priming lower the recompute needed?" in done
    assert "gen_dev15 vs gen_rand15: does the deviation rule beat random at 0.15?" in done
    costs = pd.read_csv(run_dir / "costs.csv")
    assert {"extra_query_gflop", "extra_query_s", "recompute_gflop"} <= set(costs.columns)
    assert (run_dir / "report.md").is_file()
    curve = pd.read_csv(run_dir / "analyses" / "recompute_curve.csv")
    assert set(curve["condition"]) == {"independent", "bare_dev05", "bare_dev15", "bare_dev30", "primed_generated",
                                       "gen_dev05", "gen_dev15", "gen_dev30"}
    assert (curve["n"] == 4).all()
    parity = pd.read_csv(run_dir / "analyses" / "recompute_parity.csv")
    assert list(parity["input"]) == ["independent", "primed_generated"]
    assert list(run_dir.rglob("recompute_parity.png"))


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_reproduce_blend_runs_the_blend_experiment(tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["make", "-n", "reproduce-blend", "MODEL=tiny_random_llama", "N=2"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if " run experiment=blend " in x)
    args = line.split(" run ", 1)[1].split()
    assert args == ["experiment=blend", "model=tiny_random_llama", "dataset=squad_v11", "dataset.n_samples=2"]
    cfg = compose([a for a in args if not a.startswith("dataset")] + overrides(tmp_path)[1:])
    assert len(cfg["conditions"]) == 17
