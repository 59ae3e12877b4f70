#!/usr/bin/env bash
# The main job on two CPU ranks: train a VQ-KD tokenizer on Fashion-MNIST with an ImageNet-trained
# EfficientNet-Lite0 teacher (DeepSpeed ZeRO-2, the `deepspeed` launcher), evaluate it on the test split,
# and encode a few test images to token ids. Re-running resumes or reuses what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
PY=.venv/bin/python
NPROC=${DEMO_NPROC:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

launch() {  # the deepspeed launcher on this host; on CPU it needs LOCAL_SIZE (see ../shared/notes)
  LOCAL_SIZE=$NPROC .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29600}" --module "$@"
}

echo "== 1/3 VQ-KD tokenizer: training ($NPROC ranks, ZeRO-2, fp32) =="
launch pretrain.tokenizer train vqkd_small_demo --run.output_dir="$OUT/tokenizer" --run.progress_bar=false \
  > "$OUT/tokenizer.log" 2>&1 || { tail -n 30 "$OUT/tokenizer.log"; exit 1; }

echo "== 2/3 VQ-KD tokenizer: evaluation on held-out Fashion-MNIST test images =="
$PY -m pretrain.tokenizer evaluate "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/eval.json" 2>/dev/null

echo "== 3/3 VQ-KD tokenizer: encoding 32 test images =="
$PY -m pretrain.tokenizer encode "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/test_tokens.npy" \
  --count=32 --png="$OUT/tokenizer/test_tokens.png" 2>/dev/null

$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/tokenizer/metrics.jsonl")]
first, last = rows[0], rows[-1]
ev = json.load(open(f"{out}/tokenizer/eval.json"))
print(f"tokenizer: steps {last['step']}, train loss {first['loss']:.3f} -> {last['loss']:.3f}, "
      f"{last['images_per_s']:.0f} images/s")
print(f"tokenizer eval ({ev['images']} test images): codebook usage {100 * ev['codebook_usage']:.1f}% of "
      f"{ev['num_codes']} codes (target >= 90%), perplexity {ev['perplexity']:.0f}, "
      f"cosine to teacher {ev['teacher_cosine']:.3f}")
PY
