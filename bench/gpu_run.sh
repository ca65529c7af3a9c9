#!/usr/bin/env bash
# Every GPU check in one go, for a machine lent for minutes: the card's two ceilings, the Triton
# kernels against their references (tests/test_cuda_kernels.py), the whole draft step (fused vs
# references), the trainer end to end (fused vs references), then the kernel benchmarks. Each stage
# has a time limit; everything goes to one log and the result tables to $OUT.
#
#   OUT=build/gpu-run bench/gpu_run.sh [TARGET_DIR DATA_DIR]
#
# TARGET_DIR: a Hugging Face config + tokenizer folder (weights are drawn at random: throughput does
# not depend on them); DATA_DIR: a `specfast prepare` folder for that tokenizer. Without them the
# trainer stage is skipped. Paths are relative to the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-run}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

# specfast importable without a build (kernels/ is specfast.kernels; the C++ reader is not needed)
if ! $PY -c "import specfast.kernels" 2>/dev/null; then
    [ -e specfast/kernels ] || ln -s ../kernels specfast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# STAGES="ceilings trainer ..." runs only those (default: all); PYTEST_K selects kernel tests
want() { [[ " ${STAGES:-all} " == *" all "* || " ${STAGES:-} " == *" $1 "* ]]; }

stage() {  # stage NAME LIMIT_S COMMAND...: run, log, say how it ended
    local name=$1 limit=$2 start rc
    shift 2
    want "${name%%_*}" || return 0
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - start)) s" | tee -a "$LOG"
    cp bench/results/*cuda* "$OUT"/ 2>/dev/null
    return 0
}

stage gpu 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv
stage versions 30 $PY -c "import torch, triton, transformers as t
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'transformers', t.__version__)"

stage ceilings 60 $PY - <<'EOF'
import torch, triton.testing as tt
x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
y = torch.empty_like(x)
ms = tt.do_bench(lambda: y.copy_(x), return_mode="median")
print(f"device copy: {2 * x.numel() * 2 / ms / 1e6:.0f} GB/s (read + write)")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = tt.do_bench(lambda: a @ b, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
EOF

stage kernels_vs_references 170 $PY -m pytest tests/test_cuda_kernels.py -q -rfE -p no:cacheprovider \
    ${PYTEST_K:+-k "$PYTEST_K"}

stage draft_step 120 $PY bench/gpu_train_step.py
stage profile 120 $PY bench/gpu_train_step.py --profile --rows 2048

if [ $# -ge 2 ] && want trainer; then
    # the trainer reads batches through the C++ extension: build it in place where it is missing
    $PY -c "from specfast import _shardio" 2>/dev/null ||
        stage trainer_build 120 $PY setup.py -q build_ext --inplace
    TARGET=/tmp/specfast-random-target
    stage trainer_target 60 $PY - "$1" "$TARGET" <<'EOF'
import shutil, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).to(torch.bfloat16).save_pretrained(dst)
for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(f"{src}/{f}", dst)
EOF
    for kernels in auto reference; do
        stage "trainer_$kernels" 75 env SPECFAST_KERNELS=$kernels $PY -m specfast train \
            --target "$TARGET" --data "$2" --out "/tmp/run-$kernels" --device cuda \
            --batch-tokens 2048 --ttt-steps 7 --max-steps 60 --save-every 1000 \
            --no-progress --no-tensorboard
        $PY - "/tmp/run-$kernels" "$kernels" <<'EOF' | tee -a "$LOG"
import json, sys
rows = [json.loads(x) for x in open(f"{sys.argv[1]}/metrics.jsonl")]
a, b = rows[9], rows[-1]  # steady state: after the first 10 steps (Triton compiles, warm-up)
tok = sum(r["tokens"] for r in rows[10:])
print(f"trainer SPECFAST_KERNELS={sys.argv[2]}: steps 11-{b['step']}, {tok} tokens in "
      f"{b['elapsed_s'] - a['elapsed_s']:.2f} s: {tok / (b['elapsed_s'] - a['elapsed_s']):,.0f} tok/s")
EOF
    done
fi

stage pruned_vocab_loss 100 $PY bench/pruned_vocab_loss.py --gpu
stage ttt_attention 100 $PY bench/ttt_attention.py --gpu --lengths 2048,8192 --doc-len 1024
echo "=== done" | tee -a "$LOG"
