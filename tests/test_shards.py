"""Hidden-state shards: format, round trip, reader (given batches, prefetch, resume through the
batch plan), bad data, crash safety."""

import gc
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open

from specfast import _shardio
from specfast.data.plan import BatchPlan
from specfast.shards import AUX_LAYER_CONVENTION, ShardDataset, ShardError, ShardReader, ShardWriter

H = 16


def config(**over):
    c = dict(
        target="test/tiny",
        aux_layer_ids=[1, 4, 7],
        aux_layer_convention=AUX_LAYER_CONVENTION,
        hidden_size=H,
        tokenizer_hash="tok-1234",
        extra={"note": "test"},
    )
    c.update(over)
    return c


def make_samples(count, seed, *, argmax=True, max_len=90, hidden=H):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        s = dict(
            input_ids=torch.randint(0, 50_000, (n,), generator=g),
            loss_mask=torch.rand(n, generator=g) > 0.3,
            aux_hidden=torch.randn(n, 3 * hidden, generator=g),
            final_hidden=torch.randn(n, hidden, generator=g),
        )
        if argmax:
            s["target_argmax"] = torch.randint(0, 50_000, (n,), generator=g)
        out.append(s)
    return out


def write(path, samples, shard_tokens=300, **kw):
    with ShardWriter(path, config(**kw.pop("cfg", {})), shard_tokens=shard_tokens, **kw) as w:
        for s in samples:
            w.add(s)
    return path


def assert_sample_equal(got, want, dtype=torch.bfloat16):
    assert set(got) == set(want)
    for k, v in want.items():
        expect = v.to(dtype) if v.is_floating_point() else v
        g = got[k]
        assert g.shape == expect.shape, k
        if k in ("input_ids", "target_argmax"):
            assert torch.equal(g.long(), expect.long()), k
        else:
            assert torch.equal(g, expect), k


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """37 samples over several odd-sized shards (bf16, with target_argmax)."""
    samples = make_samples(37, seed=1)
    path = write(tmp_path_factory.mktemp("ds") / "shards", samples)
    return path, samples


# ----------------------------------------------------------------------------- checksums


def test_xxh64_known_answers_and_streaming():
    vectors = [
        (0, b"", 0xEF46DB3751D8E999),
        (0, b"a", 0xD24EC4F1A98C6E5B),
        (0, b"abc", 0x44BC2CF5AD770999),
        (0, b"1234", 0xD8316E61D84F6BA4),
        (0, b"12345678", 0xD2D02F08CF7CFD4A),
        (0, b"123456789012345", 0xC377D78ADE001A3C),
        (0, b"1234567890123456", 0xB61C33DC6C59F270),
        (0, b"1234567890123456789012345678901", 0x8F367CB873A5376E),
        (0, b"12345678901234567890123456789012", 0x40FD1AA52D98274C),
        (0, b"The quick brown fox jumps over the lazy dog", 0x0B242D361FDA71BC),
        (5381, b"", 0xAF382146D5C3CACF),
        (5381, b"abc", 0x19D1C1B5C673451F),
        (5381, b"12345678901234567890123456789012", 0x38EA26E7C55F8095),
    ]
    for seed, data, want in vectors:
        assert _shardio.xxh64(data, seed) == want, data
    data = os.urandom(1000)
    cuts = [0, 1, 3, 35, 36, 64, 99, 640, 1000]
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    assert _shardio.xxh64_parts(parts) == _shardio.xxh64(data)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "dtype,index_dtype,argmax", [("bfloat16", "int32", True), ("float32", "int64", False)]
)
def test_round_trip(tmp_path, dtype, index_dtype, argmax):
    samples = make_samples(23, seed=2, argmax=argmax, max_len=120)
    write(tmp_path, samples, shard_tokens=257, dtype=dtype, index_dtype=index_dtype)
    ds = ShardDataset(tmp_path, expect=dict(dtype=dtype, hidden_size=H))
    m = ds.manifest
    assert len(m["shards"]) >= 3 and m["complete"]
    assert len(ds) == m["totals"]["samples"] == 23
    assert ds.num_tokens == m["totals"]["tokens"] == sum(len(s["input_ids"]) for s in samples)
    assert sum(s["tokens"] for s in m["shards"]) == ds.num_tokens
    assert m["totals"]["bytes"] == sum(p.stat().st_size for p in tmp_path.glob("shard-*"))
    assert m["capture"] == {**config(), "dtype": dtype}
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for i, s in enumerate(samples):
        got = ds.read_sample(i)
        assert_sample_equal(got, s, torch_dtype)
        assert got["input_ids"].dtype == {"int32": torch.int32, "int64": torch.int64}[index_dtype]
    ds.verify()


def test_writer_accepts_numpy_and_long_samples_get_own_shard(tmp_path):
    samples = make_samples(3, seed=3, max_len=40)
    samples.insert(1, make_samples(1, seed=4, max_len=1)[0])
    big = make_samples(1, seed=5, max_len=500)[0]
    big = {k: v[:1].repeat(500, *([1] * (v.dim() - 1))) for k, v in big.items()}
    samples.insert(2, big)
    with ShardWriter(tmp_path, config(), shard_tokens=100) as w:
        assert w.num_samples_done == 0
        for s in samples:
            arrays = {k: v.numpy() for k, v in s.items()}
            flipped = np.ascontiguousarray(arrays["aux_hidden"][:, ::-1])
            arrays["aux_hidden"] = flipped[:, ::-1]  # same values, negative strides
            w.add(arrays)
    ds = ShardDataset(tmp_path)
    assert [s["tokens"] for s in ds.manifest["shards"]].count(500) == 1
    for i, s in enumerate(samples):
        assert_sample_equal(ds.read_sample(i), s)


def test_safe_open_compatible_and_4k_aligned(dataset_dir):
    path, samples = dataset_dir
    ds = ShardDataset(path)
    i = 0
    for entry in ds.manifest["shards"]:
        file = path / entry["file"]
        size = file.stat().st_size
        assert size % 4096 == 0
        with open(file, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
        data_start = 8 + hlen
        assert data_start % 4096 == 0
        for name, t in header.items():
            if name.startswith("pad."):  # fillers end on a boundary, the rest start on one
                assert 0 < t["shape"][0] < 4096 and t["data_offsets"][1] % 4096 == 0, name
            elif name != "__metadata__":
                assert (data_start + t["data_offsets"][0]) % 4096 == 0, name
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata()["aux_layer_convention"] == AUX_LAYER_CONVENTION
            offsets = f.get_tensor("offsets")
            tensors = {
                k: f.get_tensor(k)
                for k in ("aux_hidden", "final_hidden", "input_ids", "loss_mask", "target_argmax")
            }
            assert f.get_tensor("sample_checksum").dtype == torch.uint64
        assert offsets[0] == 0 and offsets[-1] == entry["tokens"]
        for j in range(entry["samples"]):
            a, b = int(offsets[j]), int(offsets[j + 1])
            assert_sample_equal({k: v[a:b] for k, v in tensors.items()}, samples[i])
            i += 1
    assert i == len(samples)


# ----------------------------------------------------------------------------- reader


def test_permutation_is_pinned_and_seeded():
    # The definition is ours (SplitMix64 + Fisher-Yates): a change here breaks resumed runs.
    assert _shardio.permutation(10, 1, 0).tolist() == [8, 9, 2, 5, 1, 7, 6, 0, 4, 3]
    p = _shardio.permutation(1000, 7, 3)
    assert sorted(p.tolist()) == list(range(1000))
    assert np.array_equal(p, _shardio.permutation(1000, 7, 3))
    assert not np.array_equal(p, _shardio.permutation(1000, 7, 4))
    assert not np.array_equal(p, _shardio.permutation(1000, 8, 3))


def epoch_batches(ds, budget, seed, epoch=0, start=0, **kw):
    """Every batch of one epoch of the batch plan, as the reader yields them."""
    plan = BatchPlan(ds.sample_lengths, budget, seed)
    with ShardReader(ds, plan.epoch_batches(epoch, start), budget, **kw) as r:
        return [b for b in r]


def assert_batch_holds_samples(b, ds, samples):
    offsets = b["offsets"].tolist()
    for j, sid in enumerate(b["sample_ids"].tolist()):
        a, e = offsets[j], offsets[j + 1]
        assert e - a == len(samples[sid]["input_ids"])
        assert_sample_equal({f: b[f][a:e] for f in ds.field_names}, samples[sid])


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y)


def test_reader_reads_the_plans_shuffled_packed_epoch(dataset_dir):
    path, samples = dataset_dir
    ds = ShardDataset(path)
    budget = 150
    batches = epoch_batches(ds, budget, seed=11, epoch=2, num_threads=2, prefetch=3)
    order = torch.cat([b["sample_ids"] for b in batches]).tolist()
    shuffled = _shardio.permutation(len(ds), 11, 2)  # the plan's epoch: this, refilled
    assert order == BatchPlan(ds.sample_lengths, budget, 11).order(2).tolist()
    assert sorted(order) == sorted(shuffled.tolist())  # every sample once
    assert order != sorted(order)
    for k, b in enumerate(batches):  # batches were all held at once: none was overwritten
        total = int(b["offsets"][-1])
        assert total <= budget and b["input_ids"].shape[0] == total
        assert b["aux_hidden"].shape == (total, 3 * H) and b["aux_hidden"].dtype == torch.bfloat16
        if k + 1 < len(batches):  # greedy: the next batch's first sample would not have fitted
            assert total + int(ds.sample_lengths[batches[k + 1]["sample_ids"][0]]) > budget
        assert_batch_holds_samples(b, ds, samples)
    assert_same_batches(batches, epoch_batches(ds, budget, seed=11, epoch=2, num_threads=1))


def test_reader_yields_exactly_the_given_batches_in_order(dataset_dir):
    path, samples = dataset_dir
    ds = ShardDataset(path)
    budget = int(ds.sample_lengths.max()) * 3
    given = [
        np.array([5]),
        np.array([36, 0, 5]),
        np.array([2, 2], dtype=np.int32),
        np.arange(3, 0, -1),
        [7, 8],
    ]  # repeats, any order, any integer dtype or a list
    source = [np.asarray(g).copy() for g in given]
    with ShardReader(ds, iter(source), budget, prefetch=2) as r:
        got = list(r)
    assert [b["sample_ids"].tolist() for b in got] == [list(map(int, g)) for g in given]
    for b in got:
        assert b["sample_ids"].dtype == b["offsets"].dtype == torch.int64
        assert_batch_holds_samples(b, ds, samples)
    source[1][0] = 1  # the batch owns its ids: changing the caller's array changes nothing
    assert got[1]["sample_ids"][0] == 36


def test_reader_pulls_an_endless_plan_only_as_far_as_it_prefetches(dataset_dir):
    ds = ShardDataset(dataset_dir[0])
    budget, prefetch = 100, 3
    plan = BatchPlan(ds.sample_lengths, budget, seed=5)
    pulled = []

    def endless():
        for ids in plan.upcoming():  # never ends: epoch after epoch
            pulled.append(ids)
            yield ids

    r = ShardReader(ds, endless(), budget, prefetch=prefetch, num_threads=2)
    assert pulled == []  # nothing is read before the first batch is asked for
    n = 3 * len(list(plan.epoch_batches(0)))  # three epochs: the stream crosses epoch ends
    want = BatchPlan(ds.sample_lengths, budget, seed=5)
    for k in range(n):
        b = next(r)
        assert b["sample_ids"].tolist() == want.next().tolist()
        assert len(pulled) == k + 1 + prefetch
    r.close()  # abandons the batches read ahead and pulls nothing more
    assert len(pulled) == n + prefetch
    with pytest.raises(ValueError, match="closed"):
        next(r)


def test_reader_resumes_through_the_plan_position(dataset_dir):
    ds = ShardDataset(dataset_dir[0])
    budget = 100
    per_epoch = len(list(BatchPlan(ds.sample_lengths, budget, seed=5).epoch_batches(0)))
    total = per_epoch + 4  # across an epoch boundary
    with ShardReader(ds, BatchPlan(ds.sample_lengths, budget, seed=5).upcoming(), budget) as r:
        full = [next(r) for _ in range(total)]
    plan = BatchPlan(ds.sample_lengths, budget, seed=5)
    r = ShardReader(ds, plan.upcoming(), budget, prefetch=4)
    head = []
    for _ in range(per_epoch - 2):
        head.append(next(r))
        plan.next()
    state = plan.state_dict()
    r.close()  # abandons batches read ahead
    resumed = BatchPlan(ds.sample_lengths, budget, seed=5)
    resumed.load_state_dict(state)
    with ShardReader(ds, resumed.upcoming(), budget) as r:
        rest = [next(r) for _ in range(total - len(head))]
    assert_same_batches(head + rest, full)
    # A finished epoch resumed at its end: nothing left.
    assert epoch_batches(ds, budget, seed=5, start=len(ds)) == []


def test_reader_rejects_sample_longer_than_budget_and_bad_args(dataset_dir):
    ds = ShardDataset(dataset_dir[0])
    longest = int(ds.sample_lengths.max())
    with pytest.raises(
        ValueError,
        match=rf"longest is dataset sample \d+ "
        rf"\(shard-\d+\.safetensors, sample \d+\) "
        rf"with {longest} tokens",
    ):
        ShardReader(ds, [], batch_tokens=longest - 1)
    with pytest.raises(ValueError, match="num_threads"):
        ShardReader(ds, [], longest, num_threads=0)
    with pytest.raises(ValueError, match="batch_tokens"):
        ShardReader(ds, [], 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            ShardReader(ds, [], longest, pin_memory=True)


@pytest.mark.parametrize(
    "bad,error,msg",
    [
        (
            np.arange(37),
            ValueError,
            r"batch 1 holds \d+ tokens in 37 samples, more than "
            r"batch_tokens=",
        ),
        (np.array([], dtype=np.int64), ValueError, "batch 1 must be a non-empty 1-D integer array"),
        (np.array([[1, 2]]), ValueError, "batch 1 must be a non-empty 1-D integer array"),
        (np.array([1.0]), ValueError, "batch 1 must be a non-empty 1-D integer array"),
        (np.array([3, 37]), IndexError, r"batch 1: sample index 37 out of range \[0, 37\)"),
    ],
)
def test_reader_bad_batch_fails_at_its_turn(dataset_dir, bad, error, msg):
    path, samples = dataset_dir
    ds = ShardDataset(path)
    budget = int(ds.sample_lengths.max())
    r = ShardReader(ds, [np.array([0]), bad, np.array([1])], budget, prefetch=3)
    first = next(r)  # the batch before the bad one is yielded, intact
    with pytest.raises(error, match=msg):
        next(r)
    assert list(r) == []  # and nothing after it
    assert_batch_holds_samples(first, ds, samples)
    r.close()


def test_abandoned_reader_keeps_yielded_batch_intact(dataset_dir):
    path, samples = dataset_dir
    ds = ShardDataset(path)
    r = ShardReader(ds, BatchPlan(ds.sample_lengths, 120, seed=4).upcoming(), 120, prefetch=4)
    first = next(r)
    del r  # batches still being read ahead: threads are joined before their buffers go
    gc.collect()
    assert_batch_holds_samples(first, ds, samples)


# ----------------------------------------------------------------------------- bad data


@pytest.fixture
def small_ds(tmp_path):
    samples = make_samples(12, seed=9, max_len=60)
    write(tmp_path, samples, shard_tokens=200)
    return tmp_path, samples


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def tensor_start(path, name):
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        return 8 + hlen + json.loads(f.read(hlen))[name]["data_offsets"][0]


def test_flipped_data_byte_names_file_and_sample(small_ds):
    path, _ = small_ds
    ds = ShardDataset(path)
    file, local = ds.locate(1)
    assert (file, local) == ("shard-000000.safetensors", 1)
    shard = path / file
    a = int(ds.sample_lengths[0])  # sample 1 starts after sample 0
    flip_byte(shard, tensor_start(shard, "final_hidden") + (a + 1) * 2 * H + 3)
    ds = ShardDataset(path)  # headers and index are intact: opening succeeds
    msg = rf"checksum mismatch in .*{file}, sample 1 of that shard \(dataset sample 1\)"
    with pytest.raises(ShardError, match=msg):
        ds.read_sample(1)
    ds.read_sample(0)  # neighbours are unaffected
    with pytest.raises(ShardError, match=msg):
        epoch_batches(ds, 200, seed=0)
    with pytest.raises(ShardError, match=f"{file}: file checksum mismatch"):
        ds.verify()
    batches = epoch_batches(ds, 200, seed=0, verify=False)  # opt-out reads it anyway
    assert sum(len(b["sample_ids"]) for b in batches) == len(ds)


def test_truncated_shard(small_ds):
    path, _ = small_ds
    shard = path / "shard-000001.safetensors"
    size = shard.stat().st_size
    ds = ShardDataset(path)
    cut = tensor_start(shard, "final_hidden") - 4096  # inside aux_hidden of the last sample
    os.truncate(shard, cut)
    with pytest.raises(
        ShardError,
        match=rf"shard-000001\.safetensors is truncated: {cut} bytes, "
        rf"the manifest says {size}",
    ):
        ShardDataset(path)
    # Truncated under an open dataset: the read names file and sample.
    base = ds.manifest["shards"][0]["samples"]
    last = base + ds.manifest["shards"][1]["samples"] - 1
    with pytest.raises(
        ShardError,
        match=rf"truncated shard: .*shard-000001\.safetensors, sample "
        rf"\d+ of that shard \(dataset sample {last}\)",
    ):
        ds.read_sample(last)


def test_truncated_shard_through_reader(small_ds):
    path, _ = small_ds
    ds = ShardDataset(path)
    shard = path / "shard-000000.safetensors"
    os.truncate(shard, tensor_start(shard, "final_hidden") - 3000)  # not 4 KiB aligned
    with pytest.raises(ShardError, match=r"truncated shard: .*shard-000000\.safetensors, sample"):
        epoch_batches(ds, 200, seed=1)


def test_damaged_header(small_ds):
    path, _ = small_ds
    shard = path / "shard-000000.safetensors"
    flip_byte(shard, 40)  # inside the JSON
    with pytest.raises(
        ShardError,
        match=r"shard-000000\.safetensors: damaged header: header "
        r"checksum mismatch",
    ):
        ShardDataset(path)
    with open(shard, "r+b") as f:  # an absurd header length
        f.write(struct.pack("<Q", 1 << 40))
    with pytest.raises(ShardError, match=r"damaged header: header length \d+ does not fit"):
        ShardDataset(path)


def test_damaged_index(small_ds):
    path, _ = small_ds
    shard = path / "shard-000002.safetensors"
    flip_byte(shard, tensor_start(shard, "offsets") + 8)
    with pytest.raises(ShardError, match=r"shard-000002\.safetensors: damaged index"):
        ShardDataset(path)


def test_missing_shard_and_bad_manifest(small_ds):
    path, _ = small_ds
    (path / "shard-000001.safetensors").unlink()
    with pytest.raises(ShardError, match=r"missing shard: .*shard-000001\.safetensors is listed"):
        ShardDataset(path)
    (path / "manifest.json").write_text('{"format": "specfast-shards", "vers')
    with pytest.raises(ShardError, match=r"manifest\.json is not valid JSON"):
        ShardDataset(path)
    (path / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"manifest\.json does not exist"):
        ShardDataset(path)


@pytest.mark.parametrize(
    "key,value",
    [
        ("hidden_size", 32),
        ("aux_layer_ids", [2, 5, 8]),
        ("dtype", "float32"),
        ("tokenizer_hash", "other"),
        ("target", "test/other"),
    ],
)
def test_manifest_disagrees_with_expectation(dataset_dir, key, value):
    path, _ = dataset_dir
    have = config(dtype="bfloat16")[key]
    msg = rf"manifest\.json does not match what is expected: {key} is {have!r}, expected {value!r}"
    with pytest.raises(ShardError, match=msg.replace("[", r"\[")):
        ShardDataset(path, expect={key: value})
    ShardDataset(path, expect={key: have})
    with pytest.raises(ValueError, match="unknown capture key"):
        ShardDataset(path, expect={"hidden": 16})


def test_aux_layer_convention_is_explicit(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="vLLM's ids name a layer's input"):
        ShardWriter(tmp_path, config(aux_layer_convention="vllm_layer_input"))
    with pytest.raises(ValueError, match="lacks 'aux_layer_convention'"):
        ShardWriter(tmp_path, {k: v for k, v in config().items() if k != "aux_layer_convention"})
    with pytest.raises(ShardError, match="aux_layer_convention is 'layer_output_0based', expected"):
        ShardDataset(dataset_dir[0], expect={"aux_layer_convention": "vllm_layer_input"})


def test_writer_validates_samples(tmp_path):
    good = make_samples(1, seed=6, max_len=10)[0]
    n = len(good["input_ids"])
    w = ShardWriter(tmp_path, config())
    w.add(good)
    cases = [
        ({k: v for k, v in good.items() if k != "loss_mask"}, "missing \\['loss_mask'\\]"),
        ({**good, "aux_hidden": good["aux_hidden"][:, :H]}, rf"aux_hidden has shape \[{n}, {H}\]"),
        (
            {**good, "final_hidden": torch.full((n, H), float("nan"))},
            "final_hidden holds NaN or inf at token 0",
        ),
        (
            {**good, "aux_hidden": torch.full((n, 3 * H), 3.4e38)},  # finite in fp32, inf in bf16
            r"aux_hidden holds NaN or inf at token 0 \(after casting to BF16\)",
        ),
        ({**good, "input_ids": good["input_ids"].float()}, "integer token ids"),
        ({**good, "input_ids": torch.full((n,), 2**31)}, "token ids must lie in"),
        ({**good, "loss_mask": torch.full((n,), 2)}, "bool or 0/1"),
        ({**good, "input_ids": good["input_ids"][:0]}, "n >= 1"),
        ({**good, "aux_hidden": [[0.0]]}, "numpy array or torch tensor"),
    ]
    for sample, msg in cases:
        with pytest.raises(ValueError, match=rf"ShardWriter\.add \(sample 1\): .*{msg}"):
            w.add(sample)
    w.close()
    assert ShardDataset(tmp_path).manifest["totals"]["samples"] == 1


def test_incomplete_capture_resume_config_and_lock(tmp_path):
    samples = make_samples(9, seed=7, max_len=50)
    w = ShardWriter(tmp_path, config(), shard_tokens=100)
    for s in samples[:6]:
        w.add(s)
    with pytest.raises(ShardError, match=r"being written by another ShardWriter"):
        ShardWriter(tmp_path, config())
    w.abort()  # as if the process died: pending samples are dropped
    done = ShardDataset(tmp_path, allow_incomplete=True)
    with pytest.raises(ShardError, match=r"the capture has not finished"):
        ShardDataset(tmp_path)
    with pytest.raises(
        ShardError,
        match=r"captured with a different config \(hidden_size is 16, "
        r"expected 32",
    ):
        ShardWriter(tmp_path, config(hidden_size=32))
    with ShardWriter(tmp_path, config()) as w:
        assert w.num_samples_done == len(done) > 0
        for s in samples[w.num_samples_done :]:
            w.add(s)
    ds = ShardDataset(tmp_path)
    assert len(ds) == len(samples)
    for i, s in enumerate(samples):
        assert_sample_equal(ds.read_sample(i), s)


# ----------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from specfast.shards import AUX_LAYER_CONVENTION, ShardWriter

    CONFIG = dict(target="crash/test", aux_layer_ids=[1, 2, 3],
                  aux_layer_convention=AUX_LAYER_CONVENTION, hidden_size=64, tokenizer_hash="t")
    TOTAL = 160

    def sample(i):
        rng = np.random.default_rng(i)
        n = int(rng.integers(20, 300))
        return dict(input_ids=rng.integers(0, 32000, n), loss_mask=rng.random(n) > 0.5,
                    aux_hidden=rng.standard_normal((n, 192), dtype=np.float32),
                    final_hidden=rng.standard_normal((n, 64), dtype=np.float32))

    def run(path):
        with ShardWriter(path, CONFIG, shard_tokens=1500) as w:
            for i in range(w.num_samples_done, TOTAL):
                w.add(sample(i))

    if __name__ == "__main__":
        run(sys.argv[1])
""")


def test_killed_writer_resumes_to_identical_dataset(tmp_path):
    script = tmp_path / "capture_child.py"
    script.write_text(CHILD)
    ns = {"__name__": "child"}
    exec(compile(CHILD, str(script), "exec"), ns)
    ref, out = tmp_path / "reference", tmp_path / "killed"
    ns["run"](ref)

    rng = np.random.default_rng(0)
    kills = 0
    for _ in range(3):
        before = _committed_samples(out)
        proc = subprocess.Popen([sys.executable, str(script), str(out)])
        # Let it commit at least one more shard, then kill it at a random moment.
        deadline = time.monotonic() + 30
        while _committed_samples(out) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.05)))
        if proc.poll() is None:
            kills += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever the moment, what is committed is readable and intact.
        ds = ShardDataset(out, allow_incomplete=True)
        ds.verify()
        for i in range(0, len(ds), 7):
            ds.read_sample(i)
    assert kills >= 2, "the child finished before it could be killed"
    ns["run"](out)  # resume in-process to completion

    assert not list(out.glob(".*.tmp"))
    want = json.loads((ref / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got == want and got["complete"]
    for entry in want["shards"]:
        assert (out / entry["file"]).read_bytes() == (ref / entry["file"]).read_bytes()
    names = [sorted(p.name for p in d.glob("shard-*")) for d in (out, ref)]
    assert names[0] == names[1]


def _committed_samples(path):
    try:
        return json.loads((path / "manifest.json").read_text())["totals"]["samples"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_leftovers_of_a_killed_run_are_removed(small_ds):
    path, samples = small_ds
    m = json.loads((path / "manifest.json").read_text())
    # A shard renamed into place but never listed (killed before the manifest commit), a temp
    # file, and an unrelated file that must survive.
    (path / "shard-000042.safetensors").write_bytes(b"x" * 10)
    (path / ".shard-000043.safetensors.tmp").write_bytes(b"y" * 10)
    (path / "notes.txt").write_text("keep me")
    with ShardWriter(path, config()) as w:
        assert w.num_samples_done == len(samples)
    assert not (path / "shard-000042.safetensors").exists()
    assert not (path / ".shard-000043.safetensors.tmp").exists()
    assert (path / "notes.txt").read_text() == "keep me"
    assert json.loads((path / "manifest.json").read_text())["shards"] == m["shards"]
