#!/usr/bin/env bash
# One-shot GPU check (device tool or any CUDA host): throughput/MFU of ViT-B/16 MIM pretraining and of the
# tokenizer, and the CUDA fp16 (dynamic loss scale) + ZeRO-3 paths of both stages on synthetic images.
# Results go to ${OUT:-gpu_out}/ (see bench/gpu_env.sh). Run from the repository root.
set -uo pipefail
source bench/gpu_env.sh

echo "== fp16 + ZeRO-3 on CUDA: tokenizer (timm teacher from a local file) and MIM, tiny, synthetic images =="
python3 - <<'PY'
import timm, torch
from pretrain.tokenizer import build_tokenizer, save_tokenizer
torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), "/tmp/r18.pth")
torch.manual_seed(0)
save_tokenizer(build_tokenizer("vqkd_tiny_test", kmeans_init=False), "/tmp/tok_tiny.pt")
PY
timeout 120 python3 -m pretrain.tokenizer train vqkd_tiny_test --teacher.name=timm --teacher.timm_model=resnet18 \
  --teacher.weights=/tmp/r18.pth --teacher.layer=layer3 --data.source=synthetic --run.precision=fp16 \
  --run.ds_config=ds_configs/zero3.json --schedule.total_steps=30 --run.output_dir=/tmp/t16 2>&1 | tail -n 18 > "$OUT/tokenizer_fp16.txt"
cat "$OUT/tokenizer_fp16.txt" | grep -E '"(loss|codebook_usage|skipped_steps|loss_scale)"|error'
timeout 120 python3 -m pretrain.mim train beitv2_tiny_test --tokenizer=/tmp/tok_tiny.pt --data.source=synthetic \
  --run.precision=fp16 --run.ds_config=ds_configs/zero3.json --schedule.total_steps=30 --run.output_dir=/tmp/m16 \
  2>&1 | tail -n 18 > "$OUT/mim_fp16.txt"
cat "$OUT/mim_fp16.txt" | grep -E '"(loss|mim_acc|skipped_steps|loss_scale)"|error'
cp /tmp/t16/metrics.jsonl "$OUT/tokenizer_fp16_metrics.jsonl" 2>/dev/null
cp /tmp/m16/metrics.jsonl "$OUT/mim_fp16_metrics.jsonl" 2>/dev/null

echo "== tokenizer benchmark (official base arch, bf16, batch 64) =="
timeout 120 python3 -m bench.tokenizer --out="$OUT/bench_tokenizer.json" 2>&1 | tail -n 16

echo "== MIM pretraining benchmark (ViT-B/16, 224 px, bf16, batch 128, ZeRO-1) =="
timeout 360 python3 -m bench.pretrain --warmup=10 --variants=baseline,fused,fused_ckpt,fused_compile \
  --out="$OUT/bench_pretrain.json" 2>&1 | grep -v -i warn | tail -n 14
