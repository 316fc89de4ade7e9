#!/usr/bin/env bash
# GPU smoke test: DeepSpeed with NCCL on one GPU, a few hundred steps, samples/s recorded.
#
#   bash benchmarks/gpu_smoke.sh            # results in ${OUT:-benchmarks/results}/
#   STEPS=500 BATCH=1024 bash benchmarks/gpu_smoke.sh
#
# Two parts, each recorded on its own:
#   1. workloads/train.py under `torchrun --nproc_per_node 1` on a synthetic prepared dataset, if the workload
#      is present and accepts the arguments below (TRAIN_* variables; adjust them to train.py's CLI).
#   2. A self-contained DeepSpeed microbenchmark (deepspeed.initialize on an MLP, NCCL, bf16 when supported),
#      so the check means something even without the workload. It writes gpu_smoke.json.
# It installs nothing: it checks the python packages first and says which are missing.
set -uo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-30}
BATCH=${BATCH:-512}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"

# ---- train.py's interface: the only lines to change when workloads/train.py's CLI changes ------------------------
TRAIN_SCRIPT=${TRAIN_SCRIPT:-workloads/train.py}
SYNTH_DIR=${SYNTH_DIR:-$OUT/synthetic_prepared}
# How train.py makes a synthetic prepared dataset (empty: skip and rely on TRAIN_ARGS alone).
TRAIN_SYNTH_CMD=${TRAIN_SYNTH_CMD:-"$PYTHON $TRAIN_SCRIPT --make-synthetic $SYNTH_DIR --rows 200000"}
# Arguments after the script path for the timed run.
TRAIN_ARGS=${TRAIN_ARGS:-"--prepared $SYNTH_DIR --output $OUT/train_ckpt --max-steps $STEPS --batch-size $BATCH"}
# --------------------------------------------------------------------------------------------------------------

echo "== gpu_smoke: python=$($PYTHON -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) out=$OUT steps=$STEPS batch=$BATCH"

# ---- 0. packages -------------------------------------------------------------------------------------------------
echo "needs: torch (CUDA build), deepspeed; workload part also: dagster-pipes, numpy, pyarrow, safetensors"
$PYTHON - <<'PY'
import importlib.util, sys
need = ["torch", "deepspeed"]
optional = ["dagster_pipes", "numpy", "pyarrow", "safetensors"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
for m in need + optional:
    print(f"  {m:14s} {'ok' if importlib.util.find_spec(m) else 'MISSING'}")
if missing:
    print("cannot run: missing " + ", ".join(missing) + " (pip install torch deepspeed, CUDA build of torch)")
    sys.exit(2)
import torch
print(f"  torch {torch.__version__} cuda={torch.version.cuda} available={torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("cannot run: torch sees no CUDA device"); sys.exit(3)
print(f"  device: {torch.cuda.get_device_name(0)}; nccl={torch.distributed.is_nccl_available()}")
PY
rc=$?
if [ $rc -ne 0 ]; then exit $rc; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
unset DS_ACCELERATOR   # the CPU accelerator the local tests use must not leak in here

# ---- 1. the real workload ---------------------------------------------------------------------------------------
WORKLOAD_STATUS="skipped"
if [ -f "$TRAIN_SCRIPT" ] && [ -z "${SKIP_WORKLOAD:-}" ]; then
  echo "== 1. $TRAIN_SCRIPT under torchrun (nproc 1, NCCL)"
  if [ -n "$TRAIN_SYNTH_CMD" ]; then
    echo "+ $TRAIN_SYNTH_CMD"
    eval "$TRAIN_SYNTH_CMD" > "$OUT/train_synth.log" 2>&1 || echo "   synthetic data step failed (see $OUT/train_synth.log)"
  fi
  start=$(date +%s.%N)
  echo "+ torchrun --standalone --nproc_per_node 1 $TRAIN_SCRIPT $TRAIN_ARGS"
  # shellcheck disable=SC2086
  if timeout "${TRAIN_TIMEOUT:-300}" torchrun --standalone --nproc_per_node 1 "$TRAIN_SCRIPT" $TRAIN_ARGS \
      > "$OUT/train_workload.log" 2>&1; then
    WORKLOAD_STATUS="ok"
  else
    WORKLOAD_STATUS="failed (exit $?; see $OUT/train_workload.log)"
  fi
  end=$(date +%s.%N)
  echo "   workload: $WORKLOAD_STATUS in $(echo "$end - $start" | bc 2>/dev/null || echo '?') s"
  # The workload reports samples/s itself (Pipes metadata or its log); keep the lines that mention it.
  grep -i -E "samples.?(per.?s|/s)|samples_per_second" "$OUT/train_workload.log" | tail -5 || true
  tail -5 "$OUT/train_workload.log"
fi

# ---- 2. self-contained DeepSpeed microbenchmark ------------------------------------------------------------------
echo "== 2. DeepSpeed microbenchmark (MLP, NCCL, $STEPS steps)"
cat > "$OUT/ds_microbench.py" <<'PY'
"""DeepSpeed on one GPU with NCCL: an MLP on synthetic tabular data; reports samples/s as JSON."""
import json, os, sys, time

import deepspeed
import torch

steps, warmup, batch, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
deepspeed.init_distributed(dist_backend="nccl")
rank = torch.distributed.get_rank()
torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
bf16 = torch.cuda.is_bf16_supported()
features, hidden = 256, 1024
model = torch.nn.Sequential(
    torch.nn.Linear(features, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
    torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
config = {
    "train_micro_batch_size_per_gpu": batch,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 1e-4}},
    "zero_optimization": {"stage": 1},
    "bf16": {"enabled": bf16},
    "fp16": {"enabled": False},
    "steps_per_print": 10**9,
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
dtype = torch.bfloat16 if bf16 else torch.float32
g = torch.Generator(device="cuda").manual_seed(7)
w = torch.randn(features, 1, device="cuda", generator=g)
losses = []
for step in range(steps + warmup):
    if step == warmup:
        torch.cuda.synchronize(); t0 = time.perf_counter()
    x = torch.randn(batch, features, device="cuda", generator=g)
    y = ((x @ w) > 0).float()
    logits = engine(x.to(dtype)).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    engine.backward(loss)
    engine.step()
    if step % 50 == 0 or step == steps + warmup - 1:
        losses.append(round(loss.item(), 4))
torch.cuda.synchronize()
elapsed = time.perf_counter() - t0
world = torch.distributed.get_world_size()
result = {
    "samples_per_second": round(steps * batch * world / elapsed, 1),
    "steps": steps, "warmup_steps": warmup, "micro_batch": batch, "world_size": world,
    "seconds": round(elapsed, 3), "bf16": bf16, "zero_stage": 1, "backend": torch.distributed.get_backend(),
    "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    "cuda": torch.version.cuda, "loss_first_last": [losses[0], losses[-1]],
    "loss_decreased": losses[-1] < losses[0],
}
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
torch.distributed.destroy_process_group()
PY
torchrun --standalone --nproc_per_node 1 "$OUT/ds_microbench.py" "$STEPS" "$WARMUP" "$BATCH" "$OUT/gpu_smoke.json" \
  2>&1 | tee "$OUT/ds_microbench.log" | grep -v -E "^\[(20|W|I)" | tail -20
rc=${PIPESTATUS[0]}
echo "workload: $WORKLOAD_STATUS" > "$OUT/gpu_smoke_workload.txt"
if [ $rc -eq 0 ] && [ -s "$OUT/gpu_smoke.json" ]; then
  echo "== done: $OUT/gpu_smoke.json (workload part: $WORKLOAD_STATUS)"
else
  echo "== microbenchmark failed (exit $rc); see $OUT/ds_microbench.log"; exit 1
fi
