"""SpecForge's side of bench/train_throughput.py: its offline EAGLE-3 training step, run from the
installed package (no SpecForge code lives here), plus the venv it runs in and its input files.

    python bench/specforge_side.py --setup     # make the venv (see SETUP below)
    VENV/bin/python bench/specforge_side.py --files DIR --target DIR --vocab FILE --max-len N ...

SETUP. SpecForge 0.2.0 pins torch 2.11 and sglang, neither of which a CPU run needs, so it goes
into its own venv with ``--no-deps``: ``python -m venv --system-site-packages VENV`` (torch 2.13,
transformers, safetensors, accelerate, pydantic, pyyaml, psutil, tensorboard and triton come from
the system python), ``VENV/bin/pip install --no-deps specforge==0.2.0 yunchang`` and
``VENV/bin/pip install datasets`` (pure python, no torch). VENV is
``~/.cache/specfast-bench/specforge-venv`` unless ``SPECFAST_BENCH_VENV`` says otherwise.

THE STEP, assembled from SpecForge's own classes the way its offline trainer
(``specforge.training.trainer.Trainer``) assembles them for one process:
- data: ``build_offline_reader`` (one ref per ``*.ckpt`` file, sorted by name) →
  ``FeatureDataLoader`` over a ``LocalFeatureStore`` with the EAGLE-3 normalizer
  (``build_offline_normalizer(max_len)``: cut to max_len, last loss-mask token zeroed) and
  collator (``DataCollatorWithPadding``), batch size 1, its default 4 prefetch workers;
- model: the draft config generated from the target's config by SpecForge's provider
  (``LlamaForCausalLMEagle3``, one layer), ``draft_vocab_size`` set to the bench's, the vocab
  mapping from a ``{"d2t", "t2d"}`` file, the target's embedding loaded and frozen,
  ``OnlineEagle3Model(length=ttt, attention_backend="sdpa")``;
- step: ``TrainerCore(Eagle3TrainStrategy(model, target_head=TargetHead), backend)``: the
  strategy's ``forward_loss`` (target head over the stored final hidden state, TTT unroll, loss
  Σ 0.8^k · loss_k), ``loss.backward()``, and ``BF16Optimizer.step()`` (grad-norm clip 0.5, AdamW
  on fp32 master copies, cosine schedule). FSDP is left out: with one process it only wraps.

PATCHES for CPU, applied at run time here (site-packages is not edited):
1. On CPU, ``LogSoftmaxLoss.apply`` (a Triton kernel) → ``specforge.core.loss._compute_loss``,
   SpecForge's own PyTorch reference of the same loss, in ``specforge.algorithms.eagle3.model``.
2. The target head is built as ``TargetHead(target)`` with the tied embedding copied into ``fc``
   and kept in fp32 on CPU: ``TargetHead.from_pretrained`` needs a ``*.index.json`` (SmolLM2 has
   one ``model.safetensors`` and ties its head) and casts to bf16.
3. ``torch.compile`` (on ``_compute_loss`` and ``_compute_target_p``) stays on unless
   ``--no-compile``; it compiles in the warm-up steps (again for each new row length).
On CUDA the model runs as SpecForge's defaults have it: bf16 weights and ``flex_attention``.

Per step the runner appends a JSON line to ``--metrics``: ``step``, ``tokens`` (non-padding
tokens of the batch), ``seconds`` (loader ``next`` + ``train_step``), ``cpu_seconds``, ``loss``.
Memory cap (CPU): ``--mem-cap-gib`` sets ``RLIMIT_AS`` to what the process has mapped after
loading plus the RSS left under the cap, so an allocation past it fails; the runner then writes
``{"oom": ...}`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SPECFORGE_VERSION = "0.2.0"
VENV = Path(
    os.environ.get("SPECFAST_BENCH_VENV", "~/.cache/specfast-bench/specforge-venv")
).expanduser()
OOM_EXIT = 3
SETUP_HINT = (
    f"SpecForge {SPECFORGE_VERSION} is not installed in {VENV}; make it with "
    "`python bench/train_throughput.py --setup` (or `python bench/specforge_side.py --setup`)"
)


# -------------------------------------------------------------------- the venv (system python)
def venv_python() -> Path | None:
    """The venv's python if SpecForge imports there, else None."""
    py = VENV / "bin" / "python"
    if not py.is_file():
        return None
    probe = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('specforge'))"],
        capture_output=True,
        text=True,
    )
    return py if probe.returncode == 0 and probe.stdout.strip() == SPECFORGE_VERSION else None


def setup() -> Path:
    """Create the venv and install SpecForge into it (see the module docstring)."""
    if not (VENV / "bin" / "python").is_file():
        VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True
        )
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--no-deps", f"specforge=={SPECFORGE_VERSION}", "yunchang"], check=True)
    subprocess.run(pip + ["datasets"], check=True)
    py = venv_python()
    if py is None:
        raise RuntimeError(f"SpecForge does not import in {VENV} after setup")
    print(f"SpecForge {SPECFORGE_VERSION} ready: {py}")
    return py


# ------------------------------------------------------------- input files (system python)
def write_samples(shards: Path, sample_ids, out: Path) -> list[int]:
    """One ``torch.save`` dict per sample, SpecForge's offline format (``input_ids`` [L],
    ``loss_mask`` [L], ``hidden_state`` [1, L, H] after the target's final norm,
    ``aux_hidden_state`` [1, L, 3H]), in the given order (file names sort in it).
    Returns the token counts."""
    import torch

    from specfast.shards import ShardDataset

    ds = ShardDataset(shards)
    out.mkdir(parents=True, exist_ok=True)
    lengths = []
    for k, i in enumerate(sample_ids):
        s = ds.read_sample(int(i))
        torch.save(
            {
                "input_ids": s["input_ids"].long(),
                "loss_mask": s["loss_mask"].long(),
                "hidden_state": s["final_hidden"][None].contiguous(),
                "aux_hidden_state": s["aux_hidden"][None].contiguous(),
            },
            out / f"data_{k:06d}.ckpt",
        )
        lengths.append(int(s["input_ids"].numel()))
    return lengths


def write_vocab_mapping(prepared: Path, out: Path) -> None:
    """specfast's draft vocabulary as the ``{"d2t", "t2d"}`` file SpecForge's draft loads (same
    convention: target id = draft id + d2t[draft id])."""
    import torch
    from safetensors.torch import load_file

    v = load_file(str(prepared / "vocab.safetensors"))
    torch.save({"d2t": v["d2t"].long(), "t2d": v["t2d"].bool()}, out)


# ------------------------------------------------------------------------ runner (in the venv)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cap_address_space(cap_gib: float) -> None:
    import resource

    room = int(cap_gib * 2**30) - _status_kib("VmRSS") * 1024
    limit = _status_kib("VmSize") * 1024 + max(room, 0)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _patch(device: str, compile_: bool) -> None:
    """The run-time patches of the module docstring (the loss only on CPU)."""
    import specforge.algorithms.eagle3.model as eagle3_model
    import specforge.core.loss as loss_mod
    import torch

    if not compile_:  # the undecorated functions under torch.compile's wrappers
        for mod, name in (
            (loss_mod, "_compute_loss"),
            (eagle3_model, "_compute_target_p"),
            (eagle3_model, "_compute_metric_counts"),
            (eagle3_model, "_compute_metric_acc"),
        ):
            fn = getattr(mod, name)
            setattr(mod, name, getattr(fn, "_torchdynamo_orig_callable", fn))
    if device == "cpu":

        class ReferenceLoss:  # stands in for the Triton autograd Function
            apply = staticmethod(loss_mod._compute_loss)

        eagle3_model.LogSoftmaxLoss = ReferenceLoss
    if "OMP_NUM_THREADS" in os.environ:  # pinned by the bench (CPU)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _target_head(target: str, device, dtype):
    import torch
    from safetensors import safe_open
    from specforge.modeling.target.target_head import TargetHead

    head = TargetHead(target)
    with safe_open(os.path.join(target, "model.safetensors"), framework="pt") as f:
        key = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        with torch.no_grad():
            head.fc.weight.copy_(f.get_tensor(key))
    head.freeze_weights()
    return head.eval().to(device=device, dtype=dtype)


def _draft_model(target: str, vocab_mapping: str, draft_vocab_size: int, device, dtype, attn):
    from types import SimpleNamespace

    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.modeling.auto import AutoDraftModel
    from specforge.training.model_loading import _generate_draft_config

    cfg = SimpleNamespace(
        model=SimpleNamespace(target_model_path=target, cache_dir=None, trust_remote_code=False),
        training=SimpleNamespace(strategy="eagle3"),
    )
    config = _generate_draft_config(cfg, algorithm_providers().model.draft_config)
    config.draft_vocab_size = draft_vocab_size
    draft = AutoDraftModel.from_config(config, attention_backend=attn, torch_dtype=dtype)
    draft.load_vocab_mapping(vocab_mapping)
    draft.load_embedding(target, embedding_key="model.embed_tokens.weight")
    draft.freeze_embedding()
    return draft.to(device=device, dtype=dtype)


class _OneProcessBackend:
    """What ``FSDPTrainingBackend`` does with one process: backward, then the optimizer step."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def backward(self, loss, *, is_boundary: bool = True) -> None:
        loss.backward()

    def scale_gradients(self, factor) -> None:
        for p in self.optimizer.model_params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def step(self):
        return self.optimizer.step()


def run(args) -> int:
    os.environ.setdefault("SPECFORGE_DEVICE", args.device)
    _patch(args.device, compile_=not args.no_compile)
    import torch
    from specforge.algorithms.eagle3.data import (
        build_offline_collator,
        build_offline_normalizer,
        build_offline_reader,
    )
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.data_plane import FeatureDataLoader
    from specforge.runtime.data_plane.feature_store import LocalFeatureStore
    from specforge.training.controller import TrainerCore
    from specforge.training.strategies.base import Eagle3TrainStrategy

    torch.manual_seed(0)
    device = torch.device(args.device)
    # CPU: fp32 and sdpa (its one backend with a CPU backward); CUDA: its defaults, bf16 weights
    # (fp32 masters in BF16Optimizer) and flex_attention.
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    attn = args.attention or ("sdpa" if device.type == "cpu" else "flex_attention")
    draft = _draft_model(args.target, args.vocab, args.draft_vocab_size, device, dtype, attn)
    model = OnlineEagle3Model(draft_model=draft, length=args.ttt, attention_backend=attn)
    model = model.to(device=device, dtype=dtype)
    head = _target_head(args.target, device, dtype)
    optimizer = BF16Optimizer(
        draft, lr=args.lr, max_grad_norm=0.5, total_steps=args.steps, warmup_ratio=0.0
    )
    core = TrainerCore(Eagle3TrainStrategy(model, target_head=head), _OneProcessBackend(optimizer))
    refs = build_offline_reader(
        args.files, run_id="bench", ttt_length=args.ttt, max_len=args.max_len
    ).read(limit=args.steps)
    loader = FeatureDataLoader(
        LocalFeatureStore(),
        refs=refs,
        batch_size=1,
        collate_fn=build_offline_collator(),
        per_sample_transform=build_offline_normalizer(args.max_len),
        device=device,
        strategy="eagle3",
        num_workers=args.workers,
    )
    if args.mem_cap_gib and device.type == "cpu":  # CUDA maps far more than it uses
        _cap_address_space(args.mem_cap_gib)
    out = open(args.metrics, "a", buffering=1)
    batches = iter(loader)
    step = 0
    try:
        while step < args.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                batch = next(batches)
            except StopIteration:
                break
            result = core.train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            step += 1
            tokens = int(batch.tensors["attention_mask"].sum())
            rec = {"step": step, "tokens": tokens, "seconds": dt, "cpu_seconds": dc}
            rec["loss"] = float(result.loss)
            out.write(json.dumps(rec) + "\n")
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "alloc" in str(e).lower():
            out.write(json.dumps({"oom": str(e).splitlines()[0][:200], "step": step}) + "\n")
            out.close()
            os._exit(OOM_EXIT)  # no cleanup that could need memory
        raise
    out.close()
    loader.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="create the venv and install SpecForge")
    p.add_argument("--files", help="folder of SpecForge offline *.ckpt files (one per sample)")
    p.add_argument("--target", help="the target's Hugging Face folder")
    p.add_argument("--vocab", help='{"d2t", "t2d"} file (write_vocab_mapping)')
    p.add_argument("--draft-vocab-size", type=int, default=16384)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=4, help="loader prefetch threads (its default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention", help="attention backend (default: sdpa on CPU, else flex)")
    p.add_argument("--no-compile", action="store_true", help="run its torch.compile'd parts eager")
    p.add_argument("--mem-cap-gib", type=float, default=0.0)
    p.add_argument("--metrics", help="JSON lines out, one per step")
    args = p.parse_args(argv)
    if args.setup:
        setup()
        return 0
    missing = [f for f in ("files", "target", "vocab", "metrics") if not getattr(args, f)]
    if missing:
        p.error("needs " + ", ".join("--" + m for m in missing))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
