#!/usr/bin/env bash
# The MFU check of the MIM issue, sized for one short GPU lease (at most 9.5 minutes): FlexAttention
# gradients against SDPA on CUDA, then ViT-B/16 MIM at 224 px, batch 256, through the real loop: the previous
# best (DeepSpeed bf16 ZeRO-1 + compile, SDPA and flex) against the lean step (bf16 autocast ZeRO-0) with flex,
# flex + CUDA graphs, then SDPA. DeepSpeed's bf16 variants must come first (its autocast mode is process-wide
# state); after that the most telling first, so that a lease that ends early keeps those.
# Results go to ${OUT:-gpu_out}/ (see bench/gpu_env.sh). Run from the repository root. Stays under the device
# tool's 10-minute command limit; bench.pretrain's JSON keeps every variant finished before a timeout.
set -uo pipefail
source bench/gpu_env.sh

echo "== FlexAttention vs SDPA on CUDA (outputs and gradients) =="
timeout 100 python3 -m bench.gpu_checks 2>&1 | grep -v -i warn | tail -n 4 | tee "$OUT/gpu_checks.txt"

echo "== MIM pretraining, ViT-B/16, 224 px, batch 256 =="
timeout 460 python3 -m bench.pretrain --batch=256 --warmup=10 \
  --variants=fused_compile,flex_compile,lean_flex_compile,lean_flex_cudagraphs,lean_compile \
  --out="$OUT/bench_pretrain_b256.json" 2>&1 | grep -v -i warn | tail -n 20
