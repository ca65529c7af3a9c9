"""`specfast convert`: sample files written here in each peer's documented layout (SpecForge,
AngelSlim, speculators) convert into shards that train to the same losses as the same samples
captured by specfast; bad files are named and skipped or stop the run; a killed conversion resumes
to the same shards."""

import json

import pytest
import torch
from safetensors.torch import save_file

from specfast.capture import capture
from specfast.cli import main
from specfast.convert import SampleError, convert
from specfast.shards import ShardDataset, ShardWriter
from specfast.train.config import TrainConfig
from specfast.train.metrics import read_metrics
from specfast.train.trainer import train

BATCH_TOKENS = 160


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_prepared, tiny_target_dir):
    """The tiny prepared data captured by specfast (fp32), and its samples as tensors."""
    out = tmp_path_factory.mktemp("captured") / "shards"
    capture(
        tiny_prepared,
        out,
        str(tiny_target_dir),
        batch_tokens=BATCH_TOKENS,
        dtype="float32",
        progress=False,
    )
    ds = ShardDataset(out)
    return out, [ds.read_sample(i) for i in range(len(ds))]


def train_losses(data, out, target) -> list[float]:
    train(
        TrainConfig(
            data=str(data),
            out=str(out),
            target=str(target),
            max_steps=3,
            ttt_steps=2,
            batch_tokens=BATCH_TOKENS,
            warmup_steps=1,
            save_every=3,
            progress=False,
            tensorboard=False,
        )
    )
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def write_specforge(samples, folder, dtype=torch.float32):
    """SpecForge 0.2.0's offline files: input_ids [L], loss_mask [L], hidden_state [1, L, H],
    aux_hidden_state [1, L, 3H], names sorting in sample order."""
    folder.mkdir(parents=True)
    for i, s in enumerate(samples):
        torch.save(
            {
                "input_ids": s["input_ids"].long(),
                "loss_mask": s["loss_mask"].long(),
                "hidden_state": s["final_hidden"][None].to(dtype),
                "aux_hidden_state": s["aux_hidden"][None].to(dtype),
            },
            folder / f"data_{i}.ckpt",
        )


def write_angelslim(samples, folder, dtype=torch.bfloat16):
    """AngelSlim's: rank_0/rows_0-5000/data_<i>.ckpt with input_ids / loss_mask [1, L],
    hidden_states [1, L, 3H] (aux), target_hiddens [1, L, H] (after the final norm)."""
    rows = folder / "rank_0" / "rows_0-5000"
    rows.mkdir(parents=True)
    for i, s in enumerate(samples):
        torch.save(
            {
                "input_ids": s["input_ids"].long()[None],
                "loss_mask": s["loss_mask"].long()[None],
                "hidden_states": s["aux_hidden"][None].to(dtype),
                "target_hiddens": s["final_hidden"][None].to(dtype),
            },
            rows / f"data_{i}.ckpt",
        )


def vllm_states(model, ids, vllm_layer_ids):
    """What vLLM's hidden-state extraction stores for one sequence: [L, K + 1, H], the inputs
    of layers `vllm_layer_ids` (outputs of the layer before), then the last decoder layer's
    output before the final norm."""
    layers = model.model.layers
    wanted = [j - 1 for j in vllm_layer_ids] + [len(layers) - 1]
    got = {}
    hooks = [
        layers[i].register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i in sorted(set(wanted))
    ]
    with torch.no_grad():
        model(ids[None].long())
    for h in hooks:
        h.remove()
    return torch.stack([got[i][0] for i in wanted], dim=1)


@pytest.fixture(scope="module")
def tiny_model(tiny_target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()


def test_specforge_converts_and_trains_like_captured(
    tmp_path, captured, tiny_prepared, tiny_target_dir
):
    shards, samples = captured
    write_specforge(samples, tmp_path / "sf")
    r = convert(
        tmp_path / "sf",
        "specforge",
        tmp_path / "conv",
        target=str(tiny_target_dir),
        dtype="float32",
        vocab=tiny_prepared,
        progress=False,
    )
    assert r["samples"] == len(samples) and r["skipped"] == 0
    conv = ShardDataset(tmp_path / "conv")
    assert conv.capture["aux_layer_ids"] == ShardDataset(shards).capture["aux_layer_ids"]
    assert conv.capture["extra"]["converted_from"]["format"] == "specforge"
    for i, s in enumerate(samples):  # the argmax is recomputed from final hidden + lm_head
        c = conv.read_sample(i)
        for k in s:
            assert torch.equal(c[k], s[k]), k
    want = train_losses(shards, tmp_path / "run_captured", tiny_target_dir)
    got = train_losses(tmp_path / "conv", tmp_path / "run_converted", tiny_target_dir)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_angelslim_bf16_trains_like_captured(tmp_path, captured, tiny_prepared, tiny_target_dir):
    shards, samples = captured
    write_angelslim(samples, tmp_path / "as")
    r = convert(
        tmp_path / "as",
        "angelslim",
        tmp_path / "conv",
        target=str(tiny_target_dir),
        vocab=tiny_prepared / "vocab.safetensors",
        progress=False,
        argmax=False,  # training then computes the target's argmax itself
    )
    assert r["samples"] == len(samples)
    assert "target_argmax" not in ShardDataset(tmp_path / "conv").read_sample(0)
    want = train_losses(shards, tmp_path / "run_captured", tiny_target_dir)
    got = train_losses(tmp_path / "conv", tmp_path / "run_converted", tiny_target_dir)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["pt", "safetensors", "arrow"])
def test_speculators_converts_and_trains_like_captured(
    tmp_path, captured, tiny_prepared, tiny_target_dir, tiny_model, layout
):
    shards, samples = captured
    n = tiny_model.config.num_hidden_layers
    vllm_ids = [2, n // 2, n - 3]  # speculators' default; ours are these minus 1
    src = tmp_path / "spec"
    (src / "hidden_states").mkdir(parents=True)
    for i, s in enumerate(samples):
        states = vllm_states(tiny_model, s["input_ids"], vllm_ids)
        if layout == "pt":  # the older layout: a list of [L, H] tensors
            torch.save(
                {
                    "input_ids": s["input_ids"].long(),
                    "loss_mask": s["loss_mask"].long(),
                    "hidden_states": list(states.unbind(1)),
                },
                src / f"data_{i}.pt",
            )
        else:
            files = {"hidden_states": states.contiguous(), "token_ids": s["input_ids"].long()}
            if layout == "safetensors":
                files["loss_mask"] = s["loss_mask"].long()
            save_file(files, str(src / "hidden_states" / f"hs_{i}.safetensors"))
    if layout == "arrow":  # the loss masks live in the preprocessed dataset, row i
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict(
            {
                "input_ids": [s["input_ids"].tolist() for s in samples],
                "loss_mask": [s["loss_mask"].long().tolist() for s in samples],
                "seq_len": [len(s["input_ids"]) for s in samples],
            }
        ).save_to_disk(str(src))
    r = convert(
        src,
        "speculators",
        tmp_path / "conv",
        target=str(tiny_target_dir),
        dtype="float32",
        vocab=tiny_prepared,
        progress=False,
    )
    assert r["samples"] == len(samples)
    conv = ShardDataset(tmp_path / "conv")
    assert conv.capture["aux_layer_ids"] == [j - 1 for j in vllm_ids]
    for i, s in enumerate(samples):  # the final norm was applied to vLLM's pre-norm state
        c = conv.read_sample(i)
        torch.testing.assert_close(c["final_hidden"], s["final_hidden"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c["aux_hidden"], s["aux_hidden"], rtol=1e-4, atol=1e-4)
    want = train_losses(shards, tmp_path / "run_captured", tiny_target_dir)
    got = train_losses(tmp_path / "conv", tmp_path / "run_converted", tiny_target_dir)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-3)


class NotATensor:  # a pickled object weights_only=True must refuse
    pass


def bad_files(folder, samples):
    """Good SpecForge files with five bad ones among them; returns {name: what is wrong}."""
    write_specforge(samples[:6], folder)
    s = samples[0]
    good = {
        "input_ids": s["input_ids"].long(),
        "loss_mask": s["loss_mask"].long(),
        "hidden_state": s["final_hidden"][None],
        "aux_hidden_state": s["aux_hidden"][None],
    }
    nan = dict(good, hidden_state=good["hidden_state"].clone())
    nan["hidden_state"][0, 3, 0] = float("nan")
    bad = {
        "data_1.ckpt": (dict(good, aux_hidden_state=good["aux_hidden_state"][..., :-1]), "shape"),
        "data_2.ckpt": (nan, "NaN"),
        "data_3.ckpt": ({k: v for k, v in good.items() if k != "loss_mask"}, "missing key"),
        "data_4.ckpt": (dict(good, loss_mask=good["loss_mask"][:-1]), "length mismatch"),
        "data_5.ckpt": ({"input_ids": NotATensor()}, "weights_only"),
    }
    for name, (obj, _) in bad.items():
        torch.save(obj, folder / name)
    return {name: why for name, (_, why) in bad.items()}


def test_bad_files_stop_or_are_skipped_by_name(tmp_path, captured, tiny_target_dir, capsys):
    _, samples = captured
    bad = bad_files(tmp_path / "sf", samples)
    with pytest.raises(SampleError, match=r"data_1\.ckpt: aux_hidden_state has shape"):
        convert(tmp_path / "sf", "specforge", tmp_path / "a", target=str(tiny_target_dir))
    args = ["convert", str(tmp_path / "sf"), "--from", "specforge", "--target"]
    args += [str(tiny_target_dir), "--no-progress", "--draft-vocab-size", "16"]
    assert main(args + ["--out", str(tmp_path / "b")]) == 2
    assert "data_1.ckpt" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "c"), "--on-error", "skip"]) == 0
    report = json.loads((tmp_path / "c" / "convert_report.json").read_text())
    assert report["samples"] == 1 and report["skipped"] == len(bad)
    for name, why in bad.items():
        assert name in report["skipped_files"] and why in report["skipped_files"][name], name
    ds = ShardDataset(tmp_path / "c")
    assert torch.equal(ds.read_sample(0)["input_ids"], samples[0]["input_ids"])


def test_killed_conversion_resumes_to_identical_shards(
    tmp_path, captured, tiny_target_dir, monkeypatch
):
    _, samples = captured
    bad_files(tmp_path / "sf", samples)  # skipped files before and after the kill point
    for i, s in enumerate(samples[6:20], start=6):
        write_specforge([s], tmp_path / f"tmp{i}")
        (tmp_path / f"tmp{i}" / "data_0.ckpt").rename(tmp_path / "sf" / f"data_{i}.ckpt")
    kw = dict(target=str(tiny_target_dir), on_error="skip", shard_tokens=200, progress=False)
    convert(tmp_path / "sf", "specforge", tmp_path / "whole", **kw)

    orig, count = ShardWriter.add, [0]

    def dying_add(self, sample):
        count[0] += 1
        if count[0] == 9:
            raise KeyboardInterrupt  # like a kill: committed shards stay, the rest is lost
        orig(self, sample)

    monkeypatch.setattr(ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "sf", "specforge", tmp_path / "resumed", **kw)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert 0 < partial["totals"]["samples"] < 8 and not partial["complete"]
    monkeypatch.setattr(ShardWriter, "add", orig)
    r = convert(tmp_path / "sf", "specforge", tmp_path / "resumed", **kw)
    a, b = ShardDataset(tmp_path / "whole"), ShardDataset(tmp_path / "resumed")
    assert a.manifest["totals"] == b.manifest["totals"] and r["skipped"] == 5
    for i in range(len(a)):
        sa, sb = a.read_sample(i), b.read_sample(i)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
