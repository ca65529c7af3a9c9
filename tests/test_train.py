"""The trainer end to end on a tiny target: learning happens, a run killed with SIGKILL resumes to
the exact same losses as an uninterrupted one, export writes what vLLM/SGLang load and refuses bad
input, and the CLI answers bad input with one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from specfast.export import export_draft
from specfast.model.load import DraftFormatError, read_checkpoint, read_export
from specfast.train.config import TrainConfig
from specfast.train.metrics import read_metrics
from specfast.train.trainer import train

KILL_DRIVER = """
import os, signal, sys
from specfast.train import metrics
orig = metrics.MetricsLog.log
def log(self, rec):
    orig(self, rec)
    if rec["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # after step k is logged, before its checkpoint
metrics.MetricsLog.log = log
from specfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, env_extra=None, driver=None):
    env = dict(os.environ, **(env_extra or {}))
    cmd = (
        [sys.executable, "-c", driver, *args]
        if driver
        else [sys.executable, "-m", "specfast", *args]
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def train_args(data, target, out, steps=8):
    return [
        "train",
        "--data",
        str(data),
        "--target",
        str(target),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--save-every",
        "2",
        "--ttt-steps",
        "3",
        "--batch-tokens",
        "160",
        "--warmup-steps",
        "2",
        "--no-progress",
        "--no-tensorboard",
    ]


def tiny_config(data, target, out, **over) -> TrainConfig:
    """A few short steps on the tiny target, quietly; `over` changes any field."""
    fields = dict(max_steps=3, ttt_steps=2, batch_tokens=150, progress=False, tensorboard=False)
    return TrainConfig(data=str(data), target=str(target), out=str(out), **{**fields, **over})


def draft_weights(run) -> dict:
    """A copy of the draft's trainable tensors, to compare before and after a step."""
    return {k: v.clone() for k, v in run.draft.trainable_state_dict().items()}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_prepared, tiny_target_dir):
    full = run_cli(train_args(tiny_prepared, tiny_target_dir, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    killed = run_cli(
        train_args(tiny_prepared, tiny_target_dir, tmp_path / "cut"),
        {"KILL_AT_STEP": "5"},
        KILL_DRIVER,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]

    resumed = run_cli(train_args(tiny_prepared, tiny_target_dir, tmp_path / "cut") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["step_loss"] for r in a] == [r["step_loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]

    mismatch = run_cli(
        train_args(tiny_prepared, tiny_target_dir, tmp_path / "cut", steps=8)
        + ["--resume", "--lr", "0.1"]
    )
    assert mismatch.returncode == 2 and "cannot resume with changed settings: lr" in mismatch.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_prepared, tiny_target_dir):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        data=str(tiny_prepared),
        target=str(tiny_target_dir),
        out=str(out),
        max_steps=30,
        ttt_steps=2,
        batch_tokens=200,
        lr=3e-3,
        warmup_steps=3,
        save_every=10,
        progress=False,
        tensorboard=True,
        eval_every=10,
        eval_prompts=str(tiny_prepared / "heldout.jsonl"),
        eval_limit=2,
        eval_max_new_tokens=8,
    )
    return out, train(cfg)


def test_in_training_eval_logs_tau_and_keeps_the_best_draft(trained_run):
    out, _ = trained_run
    rows = read_metrics(out / "metrics.jsonl")
    evals = {r["step"]: r["eval_tau"] for r in rows if "eval_tau" in r}
    assert sorted(evals) == [10, 20, 30]
    assert all(1.0 <= t <= 4.0 for t in evals.values())  # K = 3
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["tau"] == max(evals.values())
    assert evals[best["step"]] == best["tau"]
    assert (out / "best" / "draft.safetensors").is_file()


def test_training_learns_and_writes_metrics_plot_tensorboard(trained_run):
    out, summary = trained_run
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 30 and summary["steps"] == 30
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert {
        "acc",
        "cond_acc",
        "sim_accept_len",
        "step_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
    } <= set(rows[-1])
    assert len(rows[-1]["acc"]) == 2 and rows[-1]["sim_accept_len"] >= 1.0
    assert (out / "metrics.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_export_layout_loads_back(trained_run, tmp_path):
    out, _ = trained_run
    exp = export_draft(out, tmp_path / "export")
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["norm_before_residual"] is False
    assert (
        cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None
    )  # plain RoPE, as vLLM expects
    assert (
        cfg["vocab_size"] == 49152
        and cfg["draft_vocab_size"] == 64
        and cfg["target_hidden_size"] == 32
    )
    # tiny target has 8 layers: default outputs [1, 3, 4]; vLLM ids are one higher, SGLang's the
    # same
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
        assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    assert "embed_tokens.weight" not in names
    assert {
        "fc.weight",
        "lm_head.weight",
        "norm.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight",
        "midlayer.mlp.down_proj.weight",
    } <= names
    tensors, dcfg = read_export(exp)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * dcfg.hidden_size


def test_export_refuses_inconsistent_checkpoints(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = trained_run
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    meta = {
        "config": json.dumps(
            json.loads(safe_open(str(ckpt / "draft.safetensors"), "pt").metadata()["config"])
        )
    }
    for breakage, message in [("d2t", "d2t"), ("nan", "NaN"), ("drop", "missing")]:
        bad = tmp_path / f"bad_{breakage}"
        bad.mkdir()
        t = load_file(str(ckpt / "draft.safetensors"))
        if breakage == "d2t":
            t["d2t"] = torch.zeros_like(t["d2t"])
        elif breakage == "nan":
            t["fc.weight"][0, 0] = float("nan")
        else:
            del t["norm.weight"]
        save_file(t, str(bad / "draft.safetensors"), metadata=meta)
        with pytest.raises(DraftFormatError, match=message):
            export_draft(bad, tmp_path / f"exp_{breakage}")
        assert not (tmp_path / f"exp_{breakage}").exists()


def test_cli_bad_input_gives_one_line(tmp_path, tiny_prepared):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: 0.001\n\tttt_steps: 3\n")  # a tab cannot start a YAML token
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    cases = [
        (["train", "--data", str(tmp_path / "nope")], "not a prepared dataset"),
        (["train", "--config", str(bad_yaml)], "bad.yaml:2: invalid YAML"),
        (["train", "--config", str(unknown)], "unknown key 'learning_rate'"),
        (["train", "--data", str(tiny_prepared), "--ttt-steps", "0"], "ttt_steps must be ≥ 1"),
        (
            ["export", str(tmp_path), "--out", str(tmp_path / "x")],
            "neither a checkpoint nor a training run",
        ),
        (
            [
                "prepare",
                "--input",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "p"),
                "--target",
                str(tmp_path / "nomodel"),
            ],
            "no such folder",
        ),
    ]
    for args, expected in cases:
        r = run_cli(args)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in r.stderr, (
            args,
            r.stderr[-1500:],
        )


def test_init_from_continues_an_exported_draft(
    tmp_path, trained_run, tiny_prepared, tiny_target_dir
):
    """`--init-from EXPORT`: the new run starts from the exported weights (fc included: the aux
    RMS init is not applied over them); one step at a negligible lr leaves them where they were."""
    out, _ = trained_run
    exp = export_draft(out, tmp_path / "export")
    cfg = tiny_config(
        tiny_prepared,
        tiny_target_dir,
        tmp_path / "continued",
        max_steps=1,
        batch_tokens=200,
        lr=1e-12,
        init_from=str(exp),
    )
    train(cfg)
    start, _ = read_export(exp)
    got, _ = read_checkpoint(tmp_path / "continued")
    for name in ("fc.weight", "lm_head.weight", "midlayer.self_attn.q_proj.weight"):
        torch.testing.assert_close(got[name].float(), start[name].float(), rtol=0, atol=1e-6)


def test_static_bucket_trains_the_same_steps(tmp_path, tiny_prepared, tiny_target_dir):
    """--static-bucket (static shapes) changes the work, not what is trained."""
    losses = []
    for bucket in (0, 64):
        cfg = tiny_config(
            tiny_prepared, tiny_target_dir, tmp_path / f"b{bucket}", static_bucket=bucket
        )
        train(cfg)
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"b{bucket}" / "metrics.jsonl")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bf16_precision_trains_close_to_fp32(tmp_path, tiny_prepared, tiny_target_dir):
    """--precision bf16 on CPU (bf16 matmuls in the target and the draft, fp32 weights, teacher and
    sums): the same batches as fp32 and losses within bf16 rounding, but not the same bits (the
    bf16 path really ran); offline too (the heads-only target in bf16)."""
    from specfast.capture import capture

    capture(
        tiny_prepared,
        tmp_path / "shards",
        str(tiny_target_dir),
        batch_tokens=150,
        dtype="float32",
        shard_tokens=500,
        progress=False,
    )
    runs = {}
    for name, data, precision in (
        ("fp32", tiny_prepared, "fp32"),
        ("bf16", tiny_prepared, "bf16"),
        ("bf16-offline", tmp_path / "shards", "bf16"),
    ):
        cfg = tiny_config(data, tiny_target_dir, tmp_path / name, precision=precision)
        if name == "bf16":  # the in-training eval decodes with the bf16 target and fp32 draft
            cfg.eval_every, cfg.eval_limit, cfg.eval_max_new_tokens = 3, 1, 6
            cfg.eval_prompts = str(tiny_prepared / "heldout.jsonl")
        train(cfg)
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
        assert read_checkpoint(tmp_path / name)[0]["fc.weight"].dtype == torch.float32
    losses = {name: [r["loss"] for r in rows] for name, rows in runs.items()}
    assert [r["tokens"] for r in runs["fp32"]] == [r["tokens"] for r in runs["bf16-offline"]]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=3e-2)
    assert losses["bf16-offline"] == pytest.approx(losses["fp32"], rel=3e-2)
    assert losses["bf16"] != losses["fp32"]
    assert runs["bf16"][-1]["eval_tau"] >= 1.0


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        TrainConfig(data="x", precision="fp16").validate()


def test_timing_bf16_matmuls_leaves_the_global_rng_alone():
    # the trainer seeds the global RNG, then opens its batches (which may time bf16 matmuls), then
    # initialises the draft: the draft must not depend on whether the timing ran
    from specfast.device import cpu_bf16_is_fast

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cpu_bf16_is_fast()
    assert torch.equal(torch.rand(3), expected)


def test_teacher_temperature_is_validated():
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        TrainConfig(data="x", teacher_temperature=0.0).validate()


def test_a_step_with_nothing_supervised_leaves_the_weights_alone(
    tmp_path, tiny_prepared, tiny_target_dir
):
    """Zero gradients still move AdamW's weights (momentum, decay): such a step is skipped, and
    the next step with supervised rows trains as usual."""
    from dataclasses import replace

    from specfast.train.distributed import SINGLE
    from specfast.train.trainer import setup_run, train_step

    cfg = tiny_config(tiny_prepared, tiny_target_dir, tmp_path / "run", max_steps=4)
    run = setup_run(cfg, SINGLE, torch.device("cpu"))

    def optimizer_state():  # per parameter: its step count and both moments
        return [{k: v.clone() for k, v in s.items()} for s in run.optimizer.state.values()]

    def same(a, b):
        return len(a) == len(b) and all(
            x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
        )

    first = train_step(run)  # the pending first batch: AdamW now has momentum to apply
    assert first["skipped"] == 0 and first["supervised"] > 0
    before, state = draft_weights(run), optimizer_state()
    batch = run.batches.next()
    run.pending = replace(batch, loss_mask=torch.zeros_like(batch.loss_mask))
    rec = train_step(run)
    assert rec["skipped"] == 1 and rec["supervised"] == 0 and rec["grad_norm"] == 0.0
    after = draft_weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert same(optimizer_state(), state)
    run.pending = batch
    rec = train_step(run)
    assert rec["skipped"] == 0 and rec["supervised"] > 0
    moved = draft_weights(run)
    assert any(not torch.equal(after[k], moved[k]) for k in after)


def test_a_micro_batch_with_nothing_supervised_does_not_dilute_the_others(
    tmp_path, tiny_prepared, tiny_target_dir
):
    """grad_accum 2 over (a batch, a batch that supervises nothing) makes the same update and
    logs the same loss as grad_accum 1 over the first batch alone."""
    from dataclasses import replace

    from specfast.train.distributed import SINGLE
    from specfast.train.trainer import setup_run, train_step

    def one_step(grad_accum):
        cfg = tiny_config(
            tiny_prepared, tiny_target_dir, tmp_path / f"ga{grad_accum}", grad_accum=grad_accum
        )
        run = setup_run(cfg, SINGLE, torch.device("cpu"))
        queue = [run.pending if run.pending is not None else run.batches.next()]
        if grad_accum == 2:
            empty = run.batches.next()
            queue.append(replace(empty, loss_mask=torch.zeros_like(empty.loss_mask)))
        run.pending = queue.pop(0)
        run.batches.next = lambda: queue.pop(0)
        return train_step(run), draft_weights(run)

    a, wa = one_step(1)
    b, wb = one_step(2)
    assert a["supervised"] == b["supervised"] > 0 and b["skipped"] == 0
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)
