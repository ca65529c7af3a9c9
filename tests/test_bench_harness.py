"""bench/harness.py: the ratio table and its file, and the child runner's value and peak RSS;
bench/quality.py's check of on-policy data."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import quality  # noqa: E402


def _allocating(mib):
    """Runs in the child: the step touches `mib` MiB and returns a small value."""
    return lambda: len(b"x" * (mib << 20)) + 1


def test_comparison_ratio_and_file(tmp_path, monkeypatch):
    lines = harness.comparison(
        [("fast", 2.0, 5.0), ("slow", 4.0, 1.0), ("missing", 1.0, None)], unit="ms"
    )
    assert lines[0] == "| case | ours (ms) | baseline (ms) | baseline / ours |"
    assert lines[2:] == [
        "| fast | 2.000 | 5.000 | 2.50× |",
        "| slow | 4.000 | 1.000 | 0.25× |",
        "| missing | 1.000 | – | – |",
    ]
    assert harness.ratio(3.0, 0.0) == "–"
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    path = harness.write_result("demo", "# Demo", lines, command="python bench/demo.py --quick")
    assert path == tmp_path / f"demo-{harness.machine_tag()}.md"
    text = path.read_text()
    assert text.startswith("# Demo\n\nMachine: ") and f"{harness.cpu_model()}" in text
    assert "torch " in text and "Command: `python bench/demo.py --quick`." in text
    assert "| fast | 2.000 | 5.000 | 2.50× |" in text


def test_child_value_and_peak_rss():
    idle = harness.run_child(_allocating, 0)
    big = harness.run_child(_allocating, 200, repeats=1)
    assert (idle.value, big.value) == (1, (200 << 20) + 1)
    assert len(big.times) == 2 and big.best == big.times[1]
    assert idle.peak_mib < 20
    assert 190 < big.peak_mib - idle.peak_mib < 260


def test_run_command_pins_to_given_cores():
    import os
    import subprocess
    import sys

    show = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    core = max(os.sched_getaffinity(0))
    res = harness.run_command(
        [sys.executable, "-c", show], cores=[core], stdout=subprocess.PIPE, text=True
    )
    assert res.stdout.split() == [f"[{core}]", "1"]
    res = harness.run_command([sys.executable, "-c", show], stdout=subprocess.PIPE, text=True)
    assert res.stdout.split() == [str(harness.pinned_cores(1)), "1"]


def test_quality_refuses_onpolicy_data_holding_a_heldout_prompt(tmp_path):
    def write(folder, name, sources):
        folder.mkdir(exist_ok=True)
        lines = [json.dumps({"source": s, "messages": []}) for s in sources]
        (folder / name).write_text("\n".join(lines) + "\n")

    base, onpolicy = tmp_path / "base", tmp_path / "onpolicy"
    write(base, "heldout.jsonl", ["file: index 3000", "file: index 3001"])
    write(onpolicy, "regenerated.jsonl", ["file: index 0", "file: index 1"])
    with pytest.raises(SystemExit, match="not a folder of `prepare --regenerate`"):
        quality.check_onpolicy(onpolicy, base)  # no meta.json: never finished
    (onpolicy / "meta.json").write_text("{}")
    quality.check_onpolicy(onpolicy, base)  # disjoint: accepted
    write(onpolicy, "regenerated.jsonl", ["file: index 0", "file: index 3001"])
    with pytest.raises(SystemExit, match="1 of its conversations are held-out prompts"):
        quality.check_onpolicy(onpolicy, base)
