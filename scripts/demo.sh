#!/usr/bin/env bash
# The main job on two CPU ranks (DeepSpeed ZeRO-2 through the `deepspeed` launcher), on real data:
#   1. train a VQ-KD tokenizer on Fashion-MNIST with an ImageNet-trained EfficientNet-Lite0 teacher,
#   2. evaluate it on the held-out test split and encode a few test images to token ids,
#   3. pretrain a small BEiT v2 (MIM + patch aggregation) against that tokenizer, export it to timm's layout,
#   4. and measure its masked-token accuracy on the held-out test split.
# A killed demo resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-runs/demo}
PY=.venv/bin/python
NPROC=${DEMO_NPROC:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

logged() {  # logged NAME CMD...: run CMD with its output in $OUT/NAME.log; show the log's end if it fails
  local name=$1; shift
  "$@" > "$OUT/$name.log" 2>&1 || { tail -n 30 "$OUT/$name.log"; echo "demo step '$name' failed"; exit 1; }
}

launch() {  # the deepspeed launcher on this host; on CPU it needs LOCAL_SIZE (see ../shared/notes)
  LOCAL_SIZE=$NPROC .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29600}" --module "$@"
}

echo "== 1/5 VQ-KD tokenizer: training ($NPROC ranks, ZeRO-2, fp32) =="
logged tokenizer launch pretrain.tokenizer train vqkd_small_demo --run.output_dir="$OUT/tokenizer" \
  --run.progress_bar=false

echo "== 2/5 VQ-KD tokenizer: evaluation on held-out Fashion-MNIST test images =="
logged evaluate $PY -m pretrain.tokenizer evaluate "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/eval.json"

echo "== 3/5 VQ-KD tokenizer: encoding 32 test images =="
logged encode $PY -m pretrain.tokenizer encode "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/test_tokens.npy" \
  --count=32 --png="$OUT/tokenizer/test_tokens.png"

echo "== 4/5 BEiT v2 MIM pretraining ($NPROC ranks, ZeRO-2, fp32) against the tokenizer, then export to timm =="
logged mim launch pretrain.mim train beitv2_small_demo --tokenizer="$OUT/tokenizer/tokenizer.pt" \
  --run.output_dir="$OUT/mim" --run.progress_bar=false
logged export $PY -m pretrain.mim export "$OUT/mim/mim.pt" "$OUT/mim/backbone_timm.safetensors"

echo "== 5/5 BEiT v2 MIM: masked-token accuracy on held-out Fashion-MNIST test images =="
logged mim_evaluate $PY -m pretrain.mim evaluate "$OUT/mim" --out="$OUT/mim/eval.json"

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
rows = [json.loads(l) for l in open(f"{out}/mim/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"MIM: steps {last['step']}, loss {first['loss']:.3f} -> {last['loss']:.3f} "
      f"(masked-token CE {first['mim_loss']:.3f} -> {last['mim_loss']:.3f}, aggregation {first['agg_loss']:.3f} -> "
      f"{last['agg_loss']:.3f}), masked-token accuracy {100 * last['mim_acc']:.1f}% / aggregation "
      f"{100 * last['agg_acc']:.1f}% (chance {100 / ev['num_codes']:.2f}%), {last['images_per_s']:.0f} images/s")
ev = json.load(open(f"{out}/mim/eval.json"))
print(f"MIM eval ({ev['images']} test images, {ev['masked_tokens']} masked patches): masked-token CE "
      f"{ev['mim_loss']:.3f}, accuracy {100 * ev['mim_acc']:.1f}% / aggregation {100 * ev['agg_acc']:.1f}% "
      f"(always the most frequent code: {100 * ev['majority_code_acc']:.1f}%)")
print(f"outputs in {out}/: tokenizer/tokenizer.pt, tokenizer/eval.json, tokenizer/test_tokens.png, mim/mim.pt, "
      f"mim/eval.json, mim/backbone_timm.safetensors, tensorboard logs in */tb")
PY
