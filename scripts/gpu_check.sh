#!/bin/bash
# The GPU checks, prepared to run in one go where a GPU is lent (GPU time is scarce):
# the CUDA test module, then the figures the README reports with the GPU named.
#   bash scripts/gpu_check.sh [DATA_DIR]      (~5 min on one GPU; writes gpu_check/*.log)
set -u
DATA=${1:-data}
PY=${PYTHON:-.venv/bin/python}
mkdir -p gpu_check
nvidia-smi -L | tee gpu_check/gpus.log
$PY -m pytest -q tests/test_cuda.py 2>&1 | tail -15 | tee gpu_check/tests.log
$PY -m bench.encoder --use_gpu --compare_hf --bf16 --batch_size 64 --seq_len 128 --steps 20 2>&1 | tee gpu_check/bench.log
$PY -m bench.mix --use_gpu --data_dir "$DATA" --precision auto 2>&1 | tee gpu_check/bench_mix.log
# one epoch of the full-data recipe (the README's `make full`, 1 of its 3 epochs), timed
/usr/bin/time -f "full recipe, 1 epoch: %e s" $PY multitask_classifier.py --use_gpu --option finetune \
  --mode mix --epochs 1 --lr 8e-5 --head_lr 1e-3 --weight_quora 2 --weight_sts 0.5 --scheduler linear \
  --warmup_ratio 0.1 --precision auto --data_dir "$DATA" --no-progress --run_dir gpu_check/full 2>&1 \
  | tail -12 | tee gpu_check/full.log
