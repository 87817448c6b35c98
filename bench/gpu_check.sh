#!/usr/bin/env bash
# One GPU check, at most 8 minutes on one GPU (GPU_CHECK_BUDGET_S, default 470 s, bounds every step): `bash bench/gpu_check.sh [OUT]` (default gpu_check/).
#
# Assumes `make setup` ran (it uses .venv/bin/python when there is one). Needs no network: without the demo's
# assets (make assets) it makes a SmolLM2-135M-shaped model from config (random weights: the memory and the speed
# are those of the real one) and synthetic documents. Every step writes its log to OUT/NN-name.log and runs under
# its own time limit; a failing step is recorded and the next one runs. OUT/summary.txt lists each step, its exit
# status and its seconds, and the script exits non-zero when any step failed.
#
# Steps: the suite's CUDA tests (pytest -m cuda), `mft cache` with a bf16 teacher, `mft train --plan` and a short
# bf16 `mft train`, a LoRA run over a bf16 base with checkpointing and adafactor (and adamw8bit where bitsandbytes
# is installed), FSDP (below), the train and memory sections of the benchmarks on CUDA, and a 2-process torchrun when
# more than one GPU is present.
#
# FSDP: `accelerate launch --config_file` with docs/SCALE.md's configuration, fsdp_version 2 and 1, float32, on 2
# processes when 2 GPUs are visible and on 1 otherwise (one rank holding every shard: still FSDP's wrapping, sharded
# checkpoints, gathering of best/ and final/), each against one plain process with the same global batch; FSDP2 also
# killed after step 5 and resumed from its step-3 checkpoint, against its uninterrupted run; then FSDP2 in bf16.
# bench/compare_runs.py compares them (OUT/fsdp.json). The CPU suite runs the same on 2 CPU processes
# (tests/test_fsdp.py), where Accelerate needs tests/fsdp_cpu_worker.py to run FSDP at all.
#
# GPU_CHECK_ONLY=REGEX runs only the steps whose name matches it, and those that make its inputs (make-model,
# mft-cache-bf16): GPU_CHECK_ONLY=fsdp is the FSDP check alone.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
N=0
T_START=$(date +%s)
DEADLINE=$((T_START + ${GPU_CHECK_BUDGET_S:-470}))  # every step's limit is cut to what is left of 8 minutes

step() {  # step NAME LIMIT_S command...: run it with its log, record its status and time, go on either way
    local name=$1 limit=$2
    shift 2
    N=$((N + 1))
    if [ -n "${GPU_CHECK_ONLY:-}" ] && ! [[ "$name" =~ $GPU_CHECK_ONLY|^make-model$|^mft-cache-bf16$ ]]; then
        printf "%-34s %-10s (GPU_CHECK_ONLY=%s)\n" "$name" "skipped" "$GPU_CHECK_ONLY" | tee -a "$SUMMARY"
        return
    fi
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        printf "%-34s %-10s (out of time)\n" "$name" "skipped" | tee -a "$SUMMARY"
        FAILED=$((FAILED + 1))
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log
    log=$(printf "%s/%02d-%s.log" "$OUT" "$N" "$name")
    local t0
    t0=$(date +%s)
    echo "[$N] $name (limit ${limit}s) ..."
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local what="ok"
    [ "$rc" -eq 124 ] && what="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && what="FAILED"
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    printf "%-34s %-10s exit %-4s %5ss  %s\n" "$name" "$what" "$rc" "$dt" "$(basename "$log")" | tee -a "$SUMMARY"
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain --untracked-files=no | grep -q . && echo '(uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); print('transformers', transformers.__version__)" 2>&1
} > "$OUT/environment.txt"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -lt 1 ]; then
    echo "no CUDA GPU visible: see $OUT/environment.txt" | tee -a "$SUMMARY"
    exit 1
fi

# the model and documents: the demo's, or a SmolLM2-135M-shaped model from config and synthetic text
MODEL=assets/model
DATA=assets/data/licenses_train.jsonl
if [ ! -f "$MODEL/config.json" ] || [ ! -f "$DATA" ]; then
    MODEL="$OUT/work/smollm2-shaped"
    DATA="$OUT/work/documents.jsonl"
    step make-model 120 $PY - "$MODEL" "$DATA" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mft_cache.testing import make_texts, make_tokenizer, write_jsonl

model, data = Path(sys.argv[1]), Path(sys.argv[2])
if not (model / "config.json").exists():
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    make_tokenizer(model, bos=True)
write_jsonl(data, make_texts(400, seed=1, min_words=60, max_words=400))
print("model", model, "documents", data)
EOF
fi
MEMORY_MODELS=$MODEL
[ -f assets/gemma/model/config.json ] && MEMORY_MODELS="$MODEL,assets/gemma/model"
W="$OUT/work"
mkdir -p "$W"

step pytest-cuda 150 $PY -m pytest -q -m cuda tests/ -p no:cacheprovider
step mft-cache-bf16 120 $PY -m mft_cache.cli cache --model "$MODEL" --data "$DATA" --out "$W/cache" --top-k 32 \
    --seq-len 256 --max-sequences 64 --device cuda --dtype bfloat16 --overwrite
step mft-train-plan 60 $PY -m mft_cache.cli train --cache "$W/cache" --out "$W/run-bf16" --batch-size 4 \
    --mixed-precision bf16 --plan
step mft-train-bf16 120 $PY -m mft_cache.cli train --cache "$W/cache" --out "$W/run-bf16" --steps 20 --batch-size 4 \
    --mixed-precision bf16 --save-every 10 --eval-every 100 --overwrite
step mft-train-lora-bf16-base 120 $PY -m mft_cache.cli train --cache "$W/cache" --out "$W/run-lora" --steps 20 \
    --batch-size 4 --peft lora --base-dtype bfloat16 --gradient-checkpointing --optimizer adafactor --lr 1e-2 \
    --save-every 10 --eval-every 100 --overwrite
if $PY -c "import bitsandbytes" 2>/dev/null; then
    step mft-train-adamw8bit 120 $PY -m mft_cache.cli train --cache "$W/cache" --out "$W/run-8bit" --steps 20 \
        --batch-size 4 --optimizer adamw8bit --mixed-precision bf16 --save-every 10 --eval-every 100 --overwrite
else
    echo "mft-train-adamw8bit                skipped    (bitsandbytes not installed: pip install -e '.[8bit]')" | tee -a "$SUMMARY"
fi
# FSDP (see the top): P processes x batch 2 against 1 x batch 2P, the same 6 steps, evaluation and checkpoints every 3
FSDP_P=1
[ "$GPUS" -gt 1 ] && FSDP_P=2
for v in 1 2; do
    cat > "$W/fsdp$v.yaml" <<EOF
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: $FSDP_P
mixed_precision: 'no'
fsdp_config:
  fsdp_version: $v
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
EOF
done
FSDP_RUN=(--cache "$W/cache" --steps 6 --lr 1e-3 --warmup-steps 1 --save-every 3 --eval-every 3
          --eval-specialized "$DATA" --eval-max-sequences 8 --eval-batch-size 2 --samples 0 --log-every 1)
fsdp_killed() {  # fsdp_killed command...: the fault kills it after step 5, its step-3 checkpoint complete
    MFT_FAULT=train:step-5 "$@"
    local rc=$?
    [ "$rc" -ne 0 ] && [ -f "$W/run-fsdp2-resumed/checkpoints/step-000003/trainer_state.json" ]
}
export -f fsdp_killed
export W
step fsdp-plain-fp32 90 $PY -m mft_cache.cli train "${FSDP_RUN[@]}" --out "$W/run-fsdp-plain" \
    --batch-size $((2 * FSDP_P)) --mixed-precision no --overwrite
for v in 2 1; do
    step fsdp$v-fp32-${FSDP_P}p 90 $PY -m accelerate.commands.launch --config_file "$W/fsdp$v.yaml" -m mft_cache.cli \
        train "${FSDP_RUN[@]}" --out "$W/run-fsdp$v" --batch-size 2 --mixed-precision no --overwrite
done
step fsdp2-killed-at-step-5 90 bash -c 'fsdp_killed "$@"' _ $PY -m accelerate.commands.launch \
    --config_file "$W/fsdp2.yaml" -m mft_cache.cli train "${FSDP_RUN[@]}" --out "$W/run-fsdp2-resumed" --batch-size 2 \
    --mixed-precision no --overwrite
step fsdp2-resumed 90 $PY -m accelerate.commands.launch --config_file "$W/fsdp2.yaml" -m mft_cache.cli train \
    "${FSDP_RUN[@]}" --out "$W/run-fsdp2-resumed" --batch-size 2 --mixed-precision no --resume
step fsdp-compare 60 $PY bench/compare_runs.py "$MODEL" "$OUT/fsdp.json" "$W/run-fsdp-plain:$W/run-fsdp2" \
    "$W/run-fsdp-plain:$W/run-fsdp1" "$W/run-fsdp2:$W/run-fsdp2-resumed"
step fsdp-not-ignored 10 bash -c '! grep -l "FSDP is asked for" "$@"' _ "$OUT"/*-fsdp*.log
step fsdp2-bf16 90 $PY -m accelerate.commands.launch --config_file "$W/fsdp2.yaml" -m mft_cache.cli train \
    "${FSDP_RUN[@]}" --out "$W/run-fsdp2-bf16" --batch-size 2 --mixed-precision bf16 --overwrite
step bench-train 240 $PY bench/run.py --device cuda --sections train --model "$MODEL" --data "$DATA" --allow-dirty \
    --no-profile --work "$W/bench-train" --results "$OUT/bench-train.json" --markdown "$OUT/BENCHMARKS-train.md"
step bench-memory 300 $PY bench/run.py --device cuda --sections memory --memory-models "$MEMORY_MODELS" --data "$DATA" \
    --memory-seq-lens 2048 --memory-modes ft-hf,ft,mft-cache --memory-variants full,full+ckpt,lora+ckpt,lora+bf16 \
    --allow-dirty --work "$W/bench-memory" --results "$OUT/bench-memory.json" --markdown "$OUT/BENCHMARKS-memory.md"
if [ "$GPUS" -gt 1 ]; then
    step torchrun-2-processes 150 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m mft_cache.cli train \
        --cache "$W/cache" --out "$W/run-ddp" --steps 10 --batch-size 2 --mixed-precision bf16 \
        --gradient-checkpointing --eval-every 100 --overwrite
else
    echo "torchrun-2-processes               skipped    (one GPU)" | tee -a "$SUMMARY"
fi

echo "total $(( $(date +%s) - T_START ))s; $FAILED step(s) failed; logs in $OUT" | tee -a "$SUMMARY"
[ "$FAILED" -eq 0 ]
