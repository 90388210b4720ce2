"""The README quotes no speed figure by hand: its table is what bench/report.py makes of bench/RESULTS.json."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, BENCH)
    try:
        import report as mod
        import workloads

        yield mod, {k: w.name for k, w in workloads.all_workloads(os.path.join(BENCH, "work"), False).items()}
    finally:
        sys.path.remove(BENCH)


def test_readme_table_is_generated_from_results_json(report):
    mod, names = report
    with open(os.path.join(BENCH, "RESULTS.json")) as f:
        records = json.load(f)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start, end = readme.index(mod.README_BEGIN) + len(mod.README_BEGIN), readme.index(mod.README_END)
    assert readme[start:end].strip() == mod.readme_speed(records, names).strip(), (
        "README's speed table is stale: run `python bench/run.py --report-only`"
    )


def test_update_readme_rewrites_only_between_the_markers(tmp_path, report):
    mod, names = report
    a, b = mod.README_BEGIN, mod.README_END
    records = [
        {
            "workload": "1",
            "op": "extract",
            "tool": "cimfs extract",
            "times": [2.0, 1.0, 3.0],
            "rss_kib": [1],
            "status": "ok",
            "commit": "abc1234",
            "quick": False,
        },
        {
            "workload": "1",
            "op": "extract",
            "tool": "unsquashfs",
            "times": [4.0, 4.0, 4.0],
            "rss_kib": [1],
            "status": "ok",
            "commit": "abc1234",
            "quick": False,
        },
        {
            "workload": "1",
            "op": "extract",
            "tool": "tar x",
            "times": [1.0],
            "rss_kib": [1],
            "status": "failed: exit 2",
            "commit": "abc1234",
            "quick": False,
        },
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"before 1.4 ×\n{a}\nold figures 9.9 ×\n{b}\nafter\n", encoding="utf-8")
    assert mod.update_readme(str(readme), records, names)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"before 1.4 ×\n{a}\n") and text.endswith(f"{b}\nafter\n")
    assert "9.9" not in text
    # median 2.00 s; paired ratios 0.5, 0.25, 0.75 -> 0.50; the failed peer is left out
    assert "| 1 stdlib | extract | `cimfs extract` | 2.00 s | 0.50 × unsquashfs |" in text
    assert "abc1234" in text
    readme.write_text("no markers\n", encoding="utf-8")
    assert not mod.update_readme(str(readme), records, names)
    assert readme.read_text(encoding="utf-8") == "no markers\n"
