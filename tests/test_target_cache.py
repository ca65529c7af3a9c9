"""The target output cache (online training without the target forward from the second epoch on)
and max_samples: a cached batch is the batch the target would have given, whatever the packing;
the cache keeps to its byte budget; a run with the cache trains the same steps as one without."""

import json

import numpy as np
import pytest
import torch

from specfast.pipeline import TargetOutputCache, assemble_batch, online_plan, open_online
from specfast.train.config import TrainConfig
from specfast.train.metrics import read_metrics
from specfast.train.trainer import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_and_target(tiny_prepared, tiny_target_dir):
    from specfast.data.prepared import PreparedData
    from specfast.targets import load_target

    return PreparedData.load(tiny_prepared), load_target(str(tiny_target_dir), device="cpu")


@pytest.mark.parametrize("fused", [True, False])
def test_cached_batches_are_the_batches_the_target_gives(data_and_target, fused):
    data, target = data_and_target
    seed = int(np.random.randint(1000))
    kw = dict(seed=seed, device=CPU, fused_teacher=fused, max_samples=5)
    cached = open_online(data, target, 100, cache_bytes=2**30, **kw)
    plain = open_online(data, target, 100, **kw)
    cache = cached.source.cache
    for _ in range(4 * 5):  # 4 epochs or more: each batch holds at least one of the 5 samples
        a_raw, b_raw = cached.next_raw(), plain.next_raw()
        assert torch.equal(a_raw["sample_ids"], b_raw["sample_ids"])
        a = assemble_batch(a_raw, target, data.vocab, CPU, cached.teacher_weight)
        b = assemble_batch(b_raw, target, data.vocab, CPU, plain.teacher_weight)
        for name in ("input_ids", "loss_mask", "doc_ids", "positions", "target_in_vocab"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        torch.testing.assert_close(a.aux_hidden, b.aux_hidden, rtol=1e-5, atol=1e-5)
        rows = a_raw["target_argmax"] >= 0
        assert torch.equal(rows, b_raw["target_argmax"] >= 0)
        assert torch.equal(a_raw["target_argmax"][rows].long(), b_raw["target_argmax"][rows])
        idx = rows.nonzero()[:, 0]
        torch.testing.assert_close(a.teacher_rows(idx), b.teacher_rows(idx), rtol=1e-5, atol=1e-5)
    assert cached.plan.epoch >= 3
    assert len(cache.samples) == 5 and cache.hits > 0
    assert cache.misses <= 5  # only batches with a sample never seen before ran the target


def test_cache_keeps_to_its_budget_and_answers_only_whole_batches():
    H, per_token = 4, (3 * 4 + 4) * 4 + 4  # fp32 aux and final, int32 argmax
    cache = TargetOutputCache(max_bytes=10 * per_token)
    offsets = torch.tensor([0, 3, 7, 12])
    aux, final = torch.randn(12, 3 * H), torch.randn(12, H)
    argmax = torch.arange(12)
    cache.put(np.array([5, 8, 2]), offsets, aux, final, argmax)  # 3 + 4 fit, then 5 would not
    assert sorted(cache.samples) == [5, 8] and cache.bytes == 7 * per_token
    got = cache.get(np.array([8, 5]))
    assert torch.equal(got[0], torch.cat([aux[3:7], aux[0:3]]))
    assert torch.equal(got[1], torch.cat([final[3:7], final[0:3]]))
    assert got[2].dtype == torch.int32 and got[2].tolist() == [3, 4, 5, 6, 0, 1, 2]
    assert cache.get(np.array([5, 2])) is None
    assert cache.stats()["batches_from_cache"] == 1 and cache.stats()["samples"] == 2


def test_max_samples_limits_every_epoch_to_the_first_samples(data_and_target):
    data, _ = data_and_target
    plan = online_plan(data, 100, seed=3, max_samples=4)
    seen = set()
    for _ in range(12):
        seen.update(int(i) for i in plan.next())
    assert plan.epoch >= 2
    assert len(seen) == 4 and seen == set(online_plan(data, 100, seed=0).eligible[:4].tolist())


def test_training_with_the_cache_trains_the_same_steps(tmp_path, tiny_prepared, tiny_target_dir):
    runs = {}
    for name, gb in (("plain", 0.0), ("cached", 1.0)):
        cfg = TrainConfig(
            data=str(tiny_prepared),
            target=str(tiny_target_dir),
            out=str(tmp_path / name),
            max_steps=8,
            ttt_steps=2,
            batch_tokens=100,
            max_samples=3,
            target_cache_gb=gb,
            progress=False,
            tensorboard=False,
        )
        train(cfg)
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    losses = {k: [r["loss"] for r in v] for k, v in runs.items()}
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-4)
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["target_cache"]["samples"] == 3
    assert summary["target_cache"]["batches_from_cache"] >= 8 - 3
    assert "target_cache" not in json.loads((tmp_path / "plain" / "summary.json").read_text())


def test_bad_cache_and_sample_settings_are_refused():
    with pytest.raises(ValueError, match="max_samples must be ≥ 0"):
        TrainConfig(data="x", max_samples=-1).validate()
    with pytest.raises(ValueError, match="target_cache_gb must be ≥ 0"):
        TrainConfig(data="x", target_cache_gb=-0.5).validate()


def test_the_cache_is_refused_for_shards(tmp_path, tiny_prepared, tiny_target_dir):
    from specfast.capture import capture

    shards = tmp_path / "shards"
    capture(tiny_prepared, shards, str(tiny_target_dir), batch_tokens=100, progress=False)
    cfg = TrainConfig(
        data=str(shards),
        target=str(tiny_target_dir),
        out=str(tmp_path / "run"),
        max_steps=1,
        target_cache_gb=1.0,
        progress=False,
        tensorboard=False,
    )
    with pytest.raises(ValueError, match="target_cache_gb is for online training"):
        train(cfg)
