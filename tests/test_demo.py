"""The demo's printed summary: what a new user reads after `make demo`."""

from specfast.demo import print_summary


def summary(**over) -> dict:
    r = dict(
        samples=2782,
        tokens=2_363_595,
        supervised_tokens=1_827_969,
        train_steps=223,
        train_tokens=109_427,
        trained_on_samples=200,
        train_tokens_per_s=303.7,
        acc_per_step=[0.302, 0.230],
        sim_accept_len=1.379,
        measured_accept_len=1.201,
        accept_rate_by_position=[0.163, 0.038, 0.0],
        outside_draft_vocab_share=0.105,
        speedup=0.558,
        export="demo-out/export",
        wall_seconds=573.8,
        device="cpu",
        precision="float32",
    )
    r.update(over)
    return r


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(name))


def test_summary_says_fp32_on_a_cpu_without_fast_bf16(capsys):
    print_summary(summary())
    out = capsys.readouterr().out
    assert "float32 on cpu" in row(out, "matmul precision")
    assert "no faster" in row(out, "matmul precision")
    assert "1.201" in row(out, "measured acceptance length")
    assert "223 / 109,427" in row(out, "train steps")


def test_summary_has_no_hint_where_bf16_runs(capsys):
    print_summary(summary(precision="bfloat16", speedup=None))
    out = capsys.readouterr().out
    assert row(out, "matmul precision").split()[-3:] == ["bfloat16", "on", "cpu"]
    assert "speedup" not in out
