"""pytest setup for bench/, loaded only when pytest is pointed at bench/ (``make bench``).

The kernel microbenchmarks run pinned to one core with one compute thread, so that the two
cores of a small machine do not compete inside one measurement. When pytest-benchmark writes its
JSON (``--benchmark-json``, as ``make bench`` asks), the hook below turns it into the table of
ours beside the baseline with the ratio, printed and written to bench/results/kernels-<machine>.md.
"""

import os
import shlex

import harness

harness.isolate(1)  # before the test modules import torch
LOAD_START = os.getloadavg()[0]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    cases: dict[str, dict[str, dict]] = {}
    for b in output_json["benchmarks"]:
        cases.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b["stats"]
    if not cases:
        return

    def rows(stat):
        return [
            (
                group,
                1e3 * impls["ours"][stat] if "ours" in impls else None,
                1e3 * impls["baseline"][stat] if "baseline" in impls else None,
            )
            for group, impls in cases.items()
        ]

    rounds = sorted({s["rounds"] for impls in cases.values() for s in impls.values()})
    body = [
        f"pytest-benchmark {output_json['version']}, CPU paths, fp32, forward + backward, "
        f"{'/'.join(map(str, rounds))} rounds after one warm-up round, one pinned core and one "
        f"thread. Ratio = baseline / ours: above 1, ours is faster. 1-min load average "
        f"{LOAD_START:.1f} before, {os.getloadavg()[0]:.1f} after: the machine is shared with "
        "other work and its noise only ever slows a run down, so the min over rounds is the "
        "estimate; the median shows the spread. Treat the times as rough. pruned_vocab_loss "
        "keeps its grad_logits for backward up to keep_bytes (128 MiB per call by default) and "
        "recomputes the logits beyond it (8·T·H·V FLOPs against 6·T·H·V) so that memory stays "
        "flat in T; the recompute case is the 0.75× row. Memory: pruned_vocab_loss-<machine>.md.",
        "",
        "Min over rounds:",
        "",
        *harness.comparison(rows("min"), unit="ms", fmt="{:.1f}"),
        "",
        "Median over rounds:",
        "",
        *harness.comparison(rows("median"), unit="ms", fmt="{:.1f}"),
    ]
    command = shlex.join(["python", "-m", "pytest", *config.invocation_params.args])
    print()
    harness.write_result("kernels", "# Kernel microbenchmarks (CPU)", body, command=command)
