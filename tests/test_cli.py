"""The command line: one registry of subcommands, each with --help for every flag; bad input is one
line and exit status 2, a bug keeps its traceback. And the draft loading behind `export` and
`eval`: a checkpoint, its run folder and its export load to the same draft."""

import argparse
import json

import pytest
import torch

from specfast.cli import build_parser, main
from specfast.data.vocab import DraftVocab
from specfast.export import export_draft
from specfast.model.checkpoint_files import save_draft_weights
from specfast.model.load import load_draft, new_draft
from specfast.targets import HFTarget

COMMANDS = {"prepare", "train", "export", "demo", "capture", "eval", "convert"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_explains_every_flag(capsys):
    subs = subcommands()
    assert set(subs) == COMMANDS
    for name, sub in subs.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.dest)
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: specfast {name}" in capsys.readouterr().out
    flags = {s for a in subs["capture"]._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == {
        "--data",
        "--out",
        "--target",
        "--batch-tokens",
        "--dtype",
        "--shard-tokens",
        "--device",
        "--no-progress",
    }


def test_bad_input_is_one_line_with_exit_status_2(tmp_path, capsys):
    cases = [
        (
            ["eval", "--draft", str(tmp_path), "--prompts", str(tmp_path / "missing.jsonl")],
            "specfast eval: error: ",
            "missing.jsonl: no such file",
        ),
        (
            ["export", str(tmp_path), "--out", str(tmp_path / "x")],
            "specfast export: error: ",
            "neither a checkpoint nor a training run",
        ),
    ]
    for args, prefix, reason in cases:
        assert main(args) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(prefix) and reason in lines[0], lines


def test_a_user_error_on_one_of_several_ranks_names_the_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specfast export: error: [rank 1] "), err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A KeyError is a programming error, not bad input: it propagates (Python prints the
    traceback) instead of becoming a one-line message, without needing -v."""
    import specfast.eval.prompts

    def broken(*args, **kwargs):
        return {}["turns"]

    monkeypatch.setattr(specfast.eval.prompts, "read_prompts", broken)
    with pytest.raises(KeyError):
        main(["eval", "--draft", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl")])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_target_dir):
    """A random draft for the tiny target, saved as a training run's checkpoint."""
    target = HFTarget(tiny_target_dir)
    torch.manual_seed(0)
    vocab = DraftVocab(torch.arange(64) * 7, target.vocab_size, float("nan"))
    ckpt = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    save_draft_weights(new_draft(target, vocab, False, torch.device("cpu")), ckpt)
    (ckpt / "state.json").write_text(json.dumps({"step": 7}))
    return target, ckpt


def test_checkpoint_run_and_export_load_the_same_draft(checkpoint, tmp_path):
    target, ckpt = checkpoint
    export = export_draft(ckpt, tmp_path / "export", dtype=torch.float32)
    loaded = [load_draft(p, target).state_dict() for p in (ckpt, ckpt.parent.parent, export)]
    for other in loaded[1:]:
        assert other.keys() == loaded[0].keys()
        for k in other:
            assert torch.equal(other[k], loaded[0][k]), k
    target.aux_layer_ids, saved = [0, 1, 2], target.aux_layer_ids
    try:
        with pytest.raises(ValueError, match="aux layers"):
            load_draft(ckpt, target)
    finally:
        target.aux_layer_ids = saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_draft(tmp_path / "nowhere", target)


def test_eval_command(checkpoint, tiny_target_dir, tmp_path, capsys):
    _, ckpt = checkpoint
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"turns": [t, "and then?"]}) + "\n"
            for t in ("hello there", "what is it", "one more")
        )
    )
    out = tmp_path / "res" / "results.json"
    args = [
        "eval",
        "--target",
        str(tiny_target_dir),
        "--draft",
        str(ckpt.parent.parent),
        "--prompts",
        str(prompts),
        "-k",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "--no-progress",
        "--limit",
        "2",
    ]
    assert main(args) == 0
    written = json.loads(out.read_text())
    assert written["num_prompts"] == 2 and written["num_turns"] == 4
    assert written["greedy_mismatched_turns"] == 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["num_prompts"] == 2


def test_every_train_flag_says_what_it_does():
    """The train flags' help comes from the comments on TrainConfig's fields: none is bare."""
    from dataclasses import fields

    from specfast.train.config import TrainConfig, field_help

    helps = field_help()
    bare = [f.name for f in fields(TrainConfig) if len(helps.get(f.name, "")) < 10]
    assert not bare, f"TrainConfig fields without a comment: {bare}"
