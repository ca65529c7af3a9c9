"""Offline mode: `specfast capture` writes shards that train to the same losses as the online run on
the same data; a capture killed mid-way resumes to the same shards; shards from another target are
refused."""

import json
import os
import subprocess
import sys

import pytest
import torch

from specfast.capture import capture
from specfast.shards import ShardDataset
from specfast.train.config import TrainConfig
from specfast.train.metrics import read_metrics
from specfast.train.trainer import train

KILL_AFTER_ADDS = """
import os, signal, sys
from specfast import shards
orig, count = shards.ShardWriter.add, [0]
def add(self, sample):
    orig(self, sample)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
shards.ShardWriter.add = add
from specfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_offline_training_matches_online(tmp_path, tiny_prepared, tiny_target_dir):
    capture(
        tiny_prepared,
        tmp_path / "shards",
        str(tiny_target_dir),
        batch_tokens=160,
        dtype="float32",
        shard_tokens=500,
        progress=False,
    )
    common = dict(
        target=str(tiny_target_dir),
        max_steps=4,
        ttt_steps=2,
        batch_tokens=160,
        warmup_steps=1,
        save_every=4,
        progress=False,
        tensorboard=False,
    )
    train(TrainConfig(data=str(tiny_prepared), out=str(tmp_path / "online"), **common))
    train(TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "offline"), **common))
    on = read_metrics(tmp_path / "online" / "metrics.jsonl")
    off = read_metrics(tmp_path / "offline" / "metrics.jsonl")
    assert [r["tokens"] for r in on] == [r["tokens"] for r in off]  # same batches
    assert [r["supervised"] for r in on] == [r["supervised"] for r in off]
    # packed target forwards differ from per-capture-group ones only by float rounding
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in off]),
        torch.tensor([r["loss"] for r in on]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_killed_capture_resumes_to_identical_shards(tmp_path, tiny_prepared, tiny_target_dir):
    args = [
        "capture",
        "--data",
        str(tiny_prepared),
        "--target",
        str(tiny_target_dir),
        "--batch-tokens",
        "160",
        "--shard-tokens",
        "300",
        "--no-progress",
    ]
    subprocess.run(
        [sys.executable, "-m", "specfast", *args, "--out", str(tmp_path / "a")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = dict(os.environ, KILL_AFTER="17")
    r = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_ADDS, *args, "--out", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -9, r.stderr[-1500:]
    partial = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert 0 < partial["totals"]["samples"] < 17 and not partial["complete"]
    r = subprocess.run(
        [sys.executable, "-m", "specfast", *args, "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-1500:]
    a, b = ShardDataset(tmp_path / "a"), ShardDataset(tmp_path / "b")
    assert len(a) == len(b) and a.manifest["totals"] == b.manifest["totals"]
    for i in range(len(a)):
        sa, sb = a.read_sample(i), b.read_sample(i)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shards_from_another_target_are_refused(
    tmp_path, tiny_prepared, tiny_target_dir, smollm2_dir
):
    capture(
        tiny_prepared, tmp_path / "shards", str(tiny_target_dir), batch_tokens=160, progress=False
    )
    cfg = TrainConfig(
        data=str(tmp_path / "shards"),
        target=str(smollm2_dir),
        out=str(tmp_path / "run"),
        max_steps=1,
        batch_tokens=160,
        progress=False,
        tensorboard=False,
    )
    with pytest.raises(ValueError, match="does not match target"):
        train(cfg)
