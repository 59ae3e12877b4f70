#!/usr/bin/env bash
# The MFU check of the MIM issue, sized for one short GPU lease (at most 9.5 minutes): FlexAttention
# gradients against SDPA on CUDA, then ViT-B/16 MIM at 224 px, batch 256, through the real loop: the previous
# best (DeepSpeed bf16 ZeRO-1 + compile, SDPA and flex) against the lean step (bf16 autocast ZeRO-0) with flex,
# then flex + CUDA graphs. DeepSpeed's bf16 variants must come first (its autocast mode is process-wide
# state); after that the most telling first, so that a lease that ends early keeps those. Then the segmentation
# step (UperNet BEiT v2 base, 512 px crops, batch 16, fused attention vs the explicit baseline), short. To make room
# for it the MIM run lost its last variant (lean_compile: the lean step with SDPA) and 90 s of its 460.
# Results go to ${OUT:-gpu_out}/ (see bench/gpu_env.sh). Run from the repository root. Stays under the device
# tool's 10-minute command limit (100 + 370 + 100 s); each bench's JSON keeps every variant finished before a
# timeout. The large segmenter does not fit here: on a later lease run
#   timeout 300 python3 -m bench.segment --arch=upernet_beitv2_large --warmup=5 --variants=baseline,fused \
#     --out="$OUT/bench_segment_large_b16.json"
set -uo pipefail
source bench/gpu_env.sh

echo "== FlexAttention vs SDPA on CUDA (outputs and gradients) =="
timeout 100 python3 -m bench.gpu_checks 2>&1 | grep -v -i warn | tail -n 4 | tee "$OUT/gpu_checks.txt"

echo "== MIM pretraining, ViT-B/16, 224 px, batch 256 =="
timeout 370 python3 -m bench.pretrain --batch=256 --warmup=10 \
  --variants=fused_compile,flex_compile,lean_flex_compile,lean_flex_cudagraphs \
  --out="$OUT/bench_pretrain_b256.json" 2>&1 | grep -v -i warn | tail -n 20

echo "== Segmentation, UperNet BEiT v2 base, 512 px, batch 16, bf16 ZeRO-1 =="
timeout 100 python3 -m bench.segment --arch=upernet_beitv2_base --batch=16 --warmup=5 --variants=baseline,fused \
  --out="$OUT/bench_segment_base_b16.json" 2>&1 | grep -v -i warn | tail -n 40
