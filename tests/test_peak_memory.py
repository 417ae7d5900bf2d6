"""Peak memory is flat in the number of samples: a run holds one chunk's caches at a time, never the run's.

Each run is a fresh process (peak RSS only grows within one), on a random model wide enough that every sample's
caches are megabytes: were caches, scores or per-sample state kept across chunks, the 4x larger run would peak
hundreds of MB higher. It may peak under 10% higher (allocator noise, the results' own few kB per line).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fixtures.jsonl import write_jsonl

CHILD = r"""
import json, resource, sys
from kvprime.config.compose import compose
from kvprime.pipeline import runner

data, out = sys.argv[1], sys.argv[2]
cfg = compose(["model=tiny_random_llama", "+model.overrides.hidden_size=512", "+model.overrides.intermediate_size=1024",
               "+model.overrides.num_hidden_layers=8", "dataset=jsonl", f"dataset.path={data}", "stats.n_boot=1000",
               "progress=false"])
runner.run_experiment(cfg, out)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _peak(tmp_path, n: int) -> float:
    passage = " ".join(f"The river number {{i}} flows past the tower {j} and the old mill into the sea."
                       for j in range(8))
    rows = [{"id": f"s{i}", "passage": passage.format(i=i), "query": f"Where does river {i} flow?",
             "answer": "into the sea"} for i in range(n)]
    data = tmp_path / f"samples{n}.jsonl"
    write_jsonl(data, rows)
    done = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tmp_path / f"run{n}")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    scored = [json.loads(x) for x in (tmp_path / f"run{n}" / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 5 * n  # exp21: five conditions, every sample scored
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"], sum(x["cache_len"] for x in scored)


@pytest.mark.integration
def test_peak_memory_is_flat_in_the_number_of_samples(tmp_path):
    (small, small_tokens), (large, large_tokens) = _peak(tmp_path, 4), _peak(tmp_path, 16)
    # What keeping the larger run's extra caches would add: 8 layers x (K, V) x 2 kv heads x 128 dims x 4 bytes
    # per cached token. It must exceed the 10% allowance, or the bound below could not catch such a leak.
    leak_mb = (large_tokens - small_tokens) * 8 * 2 * 2 * 128 * 4 / 2**20
    assert leak_mb > 0.1 * small, (leak_mb, small)
    assert large <= 1.10 * small, (small, large)
