"""SpecForge 0.2.0's EAGLE-3 training step with and without specfast's patch
(specfast.integrations.specforge: pruned_vocab_loss + ttt_attention), side by side on the same
batch: tokens/s of forward + backward and the peak extra RSS of one step.

    ~/.cache/specfast-bench/specforge-venv/bin/python bench/specforge_patch.py [--lengths 512 2048]

Runs in SpecForge's venv (bench/specforge_side.py --setup makes it; specfast comes from the system
site-packages it sees). Each case runs in a fresh child pinned to one core with one thread
(bench/harness.py): one step measured for peak memory, then `--repeats` more for time (the best
counts). The model is SpecForge's own `OnlineEagle3Model` over its `LlamaForCausalLMEagle3`, shaped
like the embedded SmolLM2 target's draft (hidden 576, 9 heads / 3 KV heads, target vocabulary
49,152, draft vocabulary 16,384), fp32, attention backend "sdpa" (its one with a CPU backward), TTT
length 7. Inputs are random but identical on both sides: aux hidden states, the teacher as the
target's final hidden state with its lm_head (SpecForge's compact-teacher path, so no
[L, 49,152] input), a loss mask with ~70% supervised tokens. On CPU SpecForge's Triton loss is
swapped for its own reference loss (bench/specforge_side.py), and torch.compile is disabled on both
sides (TORCHDYNAMO_DISABLE=1: SpecForge compiles its RoPE and RMSNorm, which would put compile time
and memory into the first step).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TORCHDYNAMO_DISABLE"] = "1"

import harness  # noqa: E402

HIDDEN, HEADS, KV_HEADS, INTER = 576, 9, 3, 1536
VOCAB, DRAFT_VOCAB, TTT = 49152, 16384, 7


def prepare(length: int, patched: bool):
    import specforge_side
    import torch

    specforge_side._patch("cpu", compile_=False)
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from transformers import LlamaConfig

    if patched:
        import specfast.integrations.specforge as sf

        sf.patch()
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=8192,
    )
    cfg.draft_vocab_size = DRAFT_VOCAB
    torch.manual_seed(0)
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa").float()
    with torch.no_grad():
        ids = torch.sort(torch.randperm(VOCAB)[:DRAFT_VOCAB]).values
        draft.d2t.copy_(ids - torch.arange(DRAFT_VOCAB))
        draft.t2d.zero_()
        draft.t2d[ids] = True
    draft.embed_tokens.weight.requires_grad_(False)
    model = OnlineEagle3Model(draft_model=draft, length=TTT, attention_backend="sdpa")
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, length, 1, generator=g) < 0.7).long()
    inputs = dict(
        input_ids=torch.randint(0, VOCAB, (1, length), generator=g),
        attention_mask=torch.ones(1, length, dtype=torch.long),
        target=None,
        loss_mask=mask,
        hidden_states=torch.randn(1, length, 3 * HIDDEN, generator=g),
        target_hidden_for_compact=torch.randn(1, length, HIDDEN, generator=g),
        target_head_weight=torch.randn(VOCAB, HIDDEN, generator=g) * 0.05,
    )

    def step():
        model.zero_grad(set_to_none=True)
        losses, *_ = model(**inputs)
        total = sum(0.8**k * loss for k, loss in enumerate(losses))
        total.backward()
        return float(total)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    try:
        import specforge  # noqa: F401
    except ImportError:
        import specforge_side

        print(specforge_side.SETUP_HINT, file=sys.stderr)
        return 1
    rows, mem = [], []
    for n in args.lengths:
        side = {}
        for patched in (False, True):
            m = harness.run_child(prepare, n, patched, repeats=args.repeats)
            side[patched] = m
            name = "patched" if patched else "SpecForge"
            print(
                f"L={n} {name}: loss {m.value:.4f}, best {m.best:.2f} s, peak {m.peak_mib:.0f} MiB"
            )
        base, ours = side[False], side[True]
        rows.append((f"L={n}", n / ours.best, n / base.best))
        mem.append((f"L={n}", ours.peak_mib, base.peak_mib))
        if abs(base.value - ours.value) > 1e-3 * abs(base.value):
            print(f"  warning: losses differ ({base.value} vs {ours.value})")
    body = ["Tokens/s (one pinned core, best of the repeats):", ""]
    body += harness.table(
        ["row", "SpecForge (tok/s)", "patched (tok/s)", "patched / SpecForge"],
        [(c, f"{b:.0f}", f"{o:.0f}", f"{o / b:.2f}×") for c, o, b in rows],
    )
    body += ["", "Peak extra RSS of one step:", ""]
    body += harness.comparison(
        mem, case="row", ours="patched", baseline="SpecForge", unit="MiB", fmt="{:.0f}"
    )
    harness.write_result(
        "specforge_patch",
        "# SpecForge 0.2.0 EAGLE-3 training step, with and without specfast's patch",
        body,
        save=not args.no_save,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
