"""bench/common.py: the one repeat-and-summarise helper every bench script uses, and the one key
of a summarised time that bench/headline.py reads."""
import glob
import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import TIME_KEY, summarise  # noqa: E402  (bench/common.py)


def _runs():
    """Two repeats of three methods on one case and one method on another; the times are chosen so
    that the median of the per-run ratios differs from the ratio of the medians."""
    times = {("A", "base"): [1.0, 2.0, 4.0], ("A", "fast"): [0.5, 3.0, 3.0], ("A", "slow"): [3.0, 2.0, 16.0],
             ("B", "fast"): [7.0, 9.0, 8.0]}
    return [{"case": case, "method": method, "repeat": repeat, "note": f"{case}{method}", TIME_KEY: t}
            for repeat in range(3) for (case, method), ts in times.items() for t in [ts[repeat]]]


def test_summarise_gives_medians_and_the_median_of_the_per_run_ratios():
    rows = summarise(_runs(), ("case", "method"), lambda row: {"method": "base"}, "time_vs_base")
    assert [(r["case"], r["method"]) for r in rows] == [("A", "base"), ("A", "fast"), ("A", "slow"), ("B", "fast")]
    slow = rows[2]
    assert slow[TIME_KEY] == 3.0 and slow["run_medians_s"] == [3.0, 2.0, 16.0]
    ratios = [3.0 / 1.0, 2.0 / 2.0, 16.0 / 4.0]
    assert slow["time_vs_base"] == statistics.median(ratios) != slow[TIME_KEY] / rows[0][TIME_KEY]
    assert slow["time_vs_base_range"] == [1.0, 4.0]
    assert rows[0]["time_vs_base"] == 1.0
    assert "repeat" not in slow and slow["note"] == "Aslow"
    assert "time_vs_base" not in rows[3]  # case B has no baseline run: no ratio, not a wrong one


def test_summarise_pairs_runs_of_the_same_repeat_only():
    runs = [r for r in _runs() if not (r["method"] == "base" and r["repeat"] == 2)]
    slow = summarise(runs, ("case", "method"), lambda row: {"method": "base"}, "time_vs_base")[2]
    assert slow["time_vs_base_range"] == [1.0, 3.0]  # the third repeat's 16 has no base to divide by


def test_every_bench_script_times_and_summarises_through_common():
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))):
        with open(path) as f:
            source = f.read()
        assert "time_step" in source and "from common import" in source, path
        assert "blocked_autorange" not in source and '"median_s"' not in source, path


@pytest.mark.parametrize("name", ["demo_cpu.json", "flows_cpu.json", "frobenius_cpu_everyday.json",
                                  "frobenius_cpu_ranking.json", "laplacian_cpu.json", "margin_cpu.json",
                                  "spectral_cpu.json", "targetprop_cpu.json", "tiles_cpu.json"])
def test_every_kept_bench_json_uses_the_one_time_key(name):
    with open(os.path.join(ROOT, "bench", "results", name)) as f:
        rows = json.load(f)["results"]
    assert rows and all(isinstance(r[TIME_KEY], float) for r in rows)
