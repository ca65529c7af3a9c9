"""In-training eval (specfast/train/live_eval.py): the `specfast eval` path on a training draft, and
the best draft kept in RUN/best."""

import json

import pytest
import torch

from specfast.data.prepared import PreparedData
from specfast.eval.evaluate import evaluate
from specfast.eval.prompts import read_prompts
from specfast.model.checkpoint_files import save_draft_weights
from specfast.model.load import load_draft, new_draft
from specfast.targets import load_target
from specfast.targets.heads import HeadsOnlyTarget
from specfast.train.live_eval import BestCheckpoint, LiveEval, best_checkpoint, can_decode


@pytest.fixture(scope="module")
def setup(tiny_target_dir, tiny_prepared):
    torch.set_num_threads(1)
    target = load_target(str(tiny_target_dir), device="cpu")
    vocab = PreparedData.load(tiny_prepared).vocab
    torch.manual_seed(0)
    draft = new_draft(target, vocab, False, torch.device("cpu"))
    return target, draft, tiny_prepared / "heldout.jsonl"


def _nudge(draft, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_live_eval_is_the_eval_path_and_leaves_training_alone(setup, tmp_path):
    target, draft, prompts = setup
    live = LiveEval(target, prompts, k=3, limit=2, max_new_tokens=12)
    draft.train()
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    rec = live(draft, step=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert draft.training and all(p.grad is None for p in draft.parameters())
    assert all(torch.equal(v, before[k]) for k, v in draft.state_dict().items())
    assert rec["eval_num_prompts"] == 2 and rec["eval_k"] == 3
    assert 1.0 <= rec["eval_tau"] <= 4.0 and rec["eval_num_drafts"] > 0
    # What `specfast eval` computes from a saved draft.
    save_draft_weights(draft, tmp_path)
    ref = evaluate(
        target,
        load_draft(tmp_path, target),
        read_prompts(prompts, limit=2),
        3,
        0.0,
        12,
        baseline=False,
        progress=False,
    )
    assert rec["eval_tau"] == ref["acceptance_length"]
    assert rec["eval_num_drafts"] == ref["num_drafts"]
    assert rec["eval_acceptance_rate"] == ref["acceptance_rate_per_position"]


def test_best_checkpoint_keeps_the_highest_tau(setup, tmp_path):
    target, draft, _ = setup
    best = BestCheckpoint(tmp_path)
    assert best.tau is None
    with pytest.raises(FileNotFoundError, match="no best draft"):
        best_checkpoint(tmp_path)
    assert best.update(draft, 10, {"eval_tau": 1.2, "eval_k": 3})
    _nudge(draft, 1)
    assert not best.update(draft, 20, {"eval_tau": 1.1, "eval_k": 3})
    assert not best.update(draft, 25, {"eval_tau": 1.2, "eval_k": 3})  # ties keep the earlier
    _nudge(draft, 2)
    assert best.update(draft, 30, {"eval_tau": 1.3, "eval_k": 3})
    kept = load_draft(best_checkpoint(tmp_path), target)
    for k, v in kept.trainable_state_dict().items():
        assert torch.equal(v, draft.trainable_state_dict()[k].float()), k
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (info["step"], info["tau"]) == (30, 1.3)
    again = BestCheckpoint(tmp_path)  # a resumed run
    assert again.tau == 1.3 and not again.update(draft, 40, {"eval_tau": 1.25})
    from specfast.export import export_draft

    out = export_draft(best_checkpoint(tmp_path), tmp_path / "export")
    assert (out / "config.json").is_file()


def test_live_eval_refuses_what_cannot_decode(setup, tmp_path):
    target, _, prompts = setup
    assert can_decode(target)
    heads = object.__new__(HeadsOnlyTarget)
    assert not can_decode(heads)
    with pytest.raises(ValueError, match="needs a target that decodes"):
        LiveEval(heads, prompts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        LiveEval(target, bad)


def test_metrics_png_plots_measured_tau(tmp_path):
    """RUN/metrics.png has a τ panel: the simulated τ of every step, and the measured one where
    an in-training eval ran (so two runs that differ only in their eval records differ)."""
    import json

    from specfast.train.metrics import plot_metrics

    def rows(with_eval):
        for step in range(1, 31):
            r = {"step": step, "loss": 10 - step / 10, "acc": [0.1, 0.05], "sim_accept_len": 1.1}
            if with_eval and step % 10 == 0:
                r.update(eval_tau=1.0 + step / 100, eval_k=3)
            yield json.dumps(r)

    pngs = []
    for with_eval in (False, True):
        metrics = tmp_path / f"m{with_eval}.jsonl"
        metrics.write_text("\n".join(rows(with_eval)) + "\n")
        plot_metrics(metrics, tmp_path / f"m{with_eval}.png")
        pngs.append((tmp_path / f"m{with_eval}.png").read_bytes())
    assert all(len(p) > 1000 for p in pngs)
    assert pngs[0] != pngs[1]
