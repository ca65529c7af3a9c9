"""Many processes on CPU (torchrun, gloo, 2 ranks): N ranks x grad_accum G train as 1 rank x N·G
(DDP online; FSDP2 offline, and online with a sharded target, resumed from one rank), a job that
loses a rank exits and resumes to the same losses, checkpoints reshard 2 -> 1 and 1 -> 2, and a
2-rank capture gives the samples of a 1-process one.

Every job is a subprocess with a timeout, so a hang fails the test instead of blocking the suite."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from specfast.capture import capture
from specfast.train.config import TrainConfig
from specfast.train.metrics import read_metrics
from specfast.train.trainer import train

STEPS = 8
# Kills rank KILL_RANK right after it finishes optimizer step KILL_AT_STEP (before its checkpoint).
KILL_DRIVER = """
import os, signal, sys
from specfast.train import trainer
orig = trainer.train_step
def train_step(run):
    record = orig(run)
    kill = (int(os.environ["KILL_AT_STEP"]), int(os.environ["KILL_RANK"]))
    if (run.step, run.ranks.rank) == kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return record
trainer.train_step = train_step
from specfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(nproc, args, tmp_path, driver=None, timeout=240, env_extra=None):
    """`torchrun --standalone --nproc_per_node N -m specfast ARGS` (or a driver script)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
    ]
    if driver is None:
        cmd += ["-m", "specfast", *args]
    else:
        script = tmp_path / "driver.py"
        script.write_text(driver)
        cmd += [str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def train_args(data, target, out, *extra):
    return [
        "train",
        "--data",
        str(data),
        "--target",
        str(target),
        "--out",
        str(out),
        "--max-steps",
        str(STEPS),
        "--save-every",
        "4",
        "--ttt-steps",
        "2",
        "--batch-tokens",
        "160",
        "--warmup-steps",
        "2",
        "--lr",
        "3e-3",
        "--no-progress",
        "--no-tensorboard",
        *extra,
    ]


def one_process(data, target, out, grad_accum=2, resume=False):
    """The reference: one process (in this one) with grad_accum 2."""
    cfg = TrainConfig(
        data=str(data),
        target=str(target),
        out=str(out),
        max_steps=STEPS,
        save_every=4,
        ttt_steps=2,
        batch_tokens=160,
        warmup_steps=2,
        lr=3e-3,
        grad_accum=grad_accum,
        progress=False,
        tensorboard=False,
    )
    train(cfg, resume=resume)
    return out


def assert_close_runs(a, b, steps=None, rel=1e-5):
    """Same tokens, same supervised counts; losses and final weights equal within `rel`."""
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    if steps is not None:
        ra = [r for r in ra if r["step"] in steps]
        rb = [r for r in rb if r["step"] in steps]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]  # the same global batches
    assert [r["supervised"] for r in ra] == [r["supervised"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (x["step"], x["loss"], y["loss"])
        assert x["step_loss"] == pytest.approx(y["step_loss"], rel=rel)
    wa = load_file(str(a / "checkpoints" / f"step_{STEPS:08d}" / "draft.safetensors"))
    wb = load_file(str(b / "checkpoints" / f"step_{STEPS:08d}" / "draft.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        if wb[k].is_floating_point():
            scale = float(wb[k].abs().max())
            torch.testing.assert_close(wa[k], wb[k], rtol=rel, atol=rel * scale)
        else:
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_prepared, tiny_target_dir):
    return one_process(tiny_prepared, tiny_target_dir, tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_prepared, tiny_target_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    r = torchrun(2, train_args(tiny_prepared, tiny_target_dir, tmp / "run"), tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run", r


def test_two_ranks_ddp_equal_one_rank_with_twice_the_accumulation(reference, ddp_run):
    run, r = ddp_run
    assert_close_runs(run, reference)
    # rank 0 alone writes: one summary on stdout, one metrics file, no per-rank logs of progress
    assert r.stdout.count('"steps": 8') == 1
    assert "specfast[rank 1]: resumed" not in r.stderr and "[rank 1]: 2 ranks" not in r.stderr
    assert sorted(p.name for p in (run / "checkpoints" / f"step_{STEPS:08d}").iterdir()) == [
        "dcp",
        "draft.safetensors",
        "rng_0.pt",
        "rng_1.pt",
        "state.json",
    ]


def test_checkpoint_of_two_ranks_resumes_on_one(
    reference, ddp_run, tmp_path, tiny_prepared, tiny_target_dir
):
    run, _ = ddp_run
    ckpt = run / "checkpoints" / "step_00000004"
    one = one_process(tiny_prepared, tiny_target_dir, tmp_path / "one", resume=str(ckpt))
    assert_close_runs(one, reference, steps=range(5, STEPS + 1))


def test_checkpoint_of_one_rank_resumes_on_two_with_fsdp2(
    reference, tmp_path, tiny_prepared, tiny_target_dir
):
    """1 -> 2, and FSDP2 (sharded draft and optimizer, and the online target's layers sharded by
    --shard-target) trains as one process does."""
    ckpt = reference / "checkpoints" / "step_00000004"
    args = train_args(
        tiny_prepared, tiny_target_dir, tmp_path / "two", "--parallel", "fsdp2", "--shard-target"
    )
    r = torchrun(2, args + ["--grad-accum", "1", "--resume", str(ckpt)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert_close_runs(tmp_path / "two", reference, steps=range(5, STEPS + 1))


def test_resume_refuses_a_different_global_batch(ddp_run, tmp_path, tiny_prepared, tiny_target_dir):
    run, _ = ddp_run
    with pytest.raises(ValueError, match="different global batch"):
        one_process(
            tiny_prepared,
            tiny_target_dir,
            tmp_path / "x",
            grad_accum=1,
            resume=str(run / "checkpoints" / "step_00000004"),
        )


def test_a_killed_rank_ends_the_job_and_the_rerun_resumes_exactly(
    ddp_run, tmp_path, tiny_prepared, tiny_target_dir
):
    uninterrupted, _ = ddp_run
    args = train_args(tiny_prepared, tiny_target_dir, tmp_path / "cut")
    t0 = time.monotonic()
    killed = torchrun(
        2, args, tmp_path, KILL_DRIVER, env_extra={"KILL_AT_STEP": "5", "KILL_RANK": "1"}
    )
    assert killed.returncode != 0 and time.monotonic() - t0 < 60, killed.stderr[-3000:]
    # torchrun names the rank that died as the root cause
    cause = killed.stderr[killed.stderr.index("Root Cause") :]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", cause), cause
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004"], ckpts  # nothing half-written is left to pick
    resumed = torchrun(2, args + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = read_metrics(uninterrupted / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit on the same 2 ranks
    assert [r["step_loss"] for r in a] == [r["step_loss"] for r in b]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_prepared, tiny_target_dir):
    """A one-process capture of the tiny data (float32, several shards)."""
    out = tmp_path_factory.mktemp("shards") / "one"
    capture(
        tiny_prepared,
        out,
        str(tiny_target_dir),
        batch_tokens=160,
        dtype="float32",
        shard_tokens=500,
        progress=False,
    )
    return out


def test_offline_two_ranks_fsdp2_equal_one_rank(shards, tiny_target_dir, tmp_path):
    """Each rank reads only its own batches from the shards; FSDP2 from the first step."""
    ref = one_process(shards, tiny_target_dir, tmp_path / "one")
    args = train_args(shards, tiny_target_dir, tmp_path / "two", "--parallel", "fsdp2")
    r = torchrun(2, args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_runs(tmp_path / "two", ref)


KILL_CAPTURE = """
import os, signal, sys
from specfast import shards
orig, count = shards.ShardWriter.add, [0]
def add(self, sample):
    orig(self, sample)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AFTER"]) and os.environ["RANK"] == os.environ["KILL_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.add = add
from specfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def sample_checksums(folder):
    """A sha256 of every sample's tensors (verified against the shard's own xxh64 on reading),
    its length, and the capture config."""
    import hashlib

    from specfast.shards import ShardDataset

    ds = ShardDataset(folder)
    sums = []
    for i in range(len(ds)):
        sample = ds.read_sample(i, verify=True)
        h = hashlib.sha256()
        for name in sorted(sample):
            h.update(sample[name].contiguous().view(torch.uint8).numpy().tobytes())
        sums.append(h.hexdigest())
    return sums, ds.sample_lengths.tolist(), ds.capture


def test_distributed_capture_gives_the_samples_of_one_process_even_when_killed(
    shards, tiny_prepared, tiny_target_dir, tmp_path
):
    args = [
        "capture",
        "--data",
        str(tiny_prepared),
        "--target",
        str(tiny_target_dir),
        "--batch-tokens",
        "160",
        "--dtype",
        "float32",
        "--shard-tokens",
        "300",
        "--no-progress",
        "--out",
        str(tmp_path / "two"),
    ]
    env = {"KILL_AFTER": "9", "KILL_RANK": "1"}
    killed = torchrun(2, args, tmp_path, KILL_CAPTURE, env_extra=env)
    assert killed.returncode != 0
    assert not (tmp_path / "two" / "manifest.json").exists()  # nothing merged from a broken job
    with pytest.raises(ValueError, match="started by 2 ranks"):
        capture(tiny_prepared, tmp_path / "two", str(tiny_target_dir), 160, "float32")
    resumed = torchrun(2, args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "merged 2 ranks' captures" in resumed.stderr
    assert sorted(
        p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("shard-")
    ) == [
        "manifest.json",
        "prepared_meta.json",
        "vocab.safetensors",
    ]
    assert sample_checksums(tmp_path / "two") == sample_checksums(shards)


HANG_DRIVER = """
import os, sys, time
from specfast.train import trainer
orig = trainer.train_step
def train_step(run):
    if run.step == 2 and run.ranks.rank == 1:
        time.sleep(600)  # alive but silent: the other rank waits in a collective
    return orig(run)
trainer.train_step = train_step
from specfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_silent_rank_times_out_instead_of_hanging(tmp_path, tiny_prepared, tiny_target_dir):
    args = train_args(tiny_prepared, tiny_target_dir, tmp_path / "run")
    t0 = time.monotonic()
    r = torchrun(2, args, tmp_path, HANG_DRIVER, env_extra={"SPECFAST_DIST_TIMEOUT_S": "5"})
    assert r.returncode != 0 and time.monotonic() - t0 < 120
    assert "Timed out" in r.stderr and "Root Cause" in r.stderr
