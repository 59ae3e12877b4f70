#!/usr/bin/env bash
# The main job on the CPU, on real data. The tokenizer and MIM training stages each run as one DeepSpeed process on
# every core (on a small CPU that is faster than a rank per core: bench/demo_step.py); DEMO_NPROC=N runs them as N
# ranks through the `deepspeed` launcher (ZeRO-2) at the same global batch instead:
#   1. train a VQ-KD tokenizer on Fashion-MNIST with an ImageNet-trained EfficientNet-Lite0 teacher,
#   2. pretrain a small BEiT v2 (MIM + patch aggregation) against that tokenizer, export it to timm's layout,
#   3. evaluate the tokenizer (and encode a few test images to token ids) and the MIM model's masked-token accuracy on
#      the held-out test split,
#   4. judge the pretraining downstream: linear probe and k-NN of the pretrained backbone, the same arch with
#      random weights and the tokenizer's encoder, and a short fine-tune from pretrained and from random weights,
#      all on the held-out test split,
#   5. and in semantic segmentation on Fashion-MNIST mosaics (garments of the training / test split pasted on
#      canvases, written in the ADE20K layout and converted to .beton): UperNet fine-tuned from the pretrained and
#      from a random backbone, and the linear probe of each frozen backbone, mIoU on the held-out mosaics;
#      results.json and report.md (with plots) sum it up.
# Steps 3-5 are independent jobs: they run in two lanes side by side, each on half the cores (on 2 cores, two
# one-thread processes train 1.15x the images/s of one two-thread process, and each one's single-threaded start-up
# overlaps the other's work). A killed demo resumes where it stopped when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
# Settings are checked before any work: a bad one would otherwise surface minutes in, after the tokenizer's training.
whole() {  # whole NAME VALUE MIN: VALUE as a whole number >= MIN (leading zeros dropped), or a one-line error
  [[ "$2" =~ ^[0-9]+$ ]] && [ "$((10#$2))" -ge "$3" ] || {
    echo "demo: $1 must be a whole number >= $3, got '$2'" >&2; exit 2; }
  echo "$((10#$2))"
}
SEED=$(whole DEMO_SEED "${DEMO_SEED:-0}" 0)   # the MIM run's seed; the tokenizer's and the transfer jobs' stay fixed
NPROC=$(whole DEMO_NPROC "${DEMO_NPROC:-1}" 1)
CORES=$(whole DEMO_CORES "${DEMO_CORES:-$(nproc)}" 1)
OUT=${DEMO_OUT:-runs/demo$([ "$SEED" = 0 ] || echo "_seed$SEED")}
PY=.venv/bin/python
GLOBAL_BATCH=64   # the demo recipes' micro_batch_size on one process
mkdir -p "$OUT"
SECS_DIR=$OUT/seconds   # one file per step: its wall seconds (the lanes run in subshells)
rm -rf "$SECS_DIR" && mkdir -p "$SECS_DIR"

logged() {  # logged NAME CMD...: run CMD with its output in $OUT/NAME.log; show the log's end if it fails
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || { tail -n 30 "$OUT/$name.log"; echo "demo step '$name' failed"; exit 1; }
  echo $((SECONDS - start)) > "$SECS_DIR/$name"
}

launch() {  # launch MODULE ARGS...: a training command, one process on $CORES cores or NPROC ranks of one thread each
  if [ "$NPROC" -eq 1 ]; then
    env OMP_NUM_THREADS="$CORES" $PY -m "$@"
  else   # the deepspeed launcher on this host; on CPU it needs LOCAL_SIZE (its CPU accelerator reads it)
    OMP_NUM_THREADS=1 LOCAL_SIZE=$NPROC .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29600}" \
      --module "$@" --run.micro_batch_size=$((GLOBAL_BATCH / NPROC)) --run.ds_config=ds_configs/zero2.json
  fi
}
one() { env OMP_NUM_THREADS="$CORES" $PY -m "$@"; }   # a one-process command on $CORES cores

source scripts/lanes.sh   # lanes FN_A FN_B: two jobs side by side on half the cores each

echo "== 1/5 VQ-KD tokenizer: training ($NPROC process(es), $CORES cores) =="
logged tokenizer launch pretrain.tokenizer train vqkd_small_demo --run.output_dir="$OUT/tokenizer" \
  --run.progress_bar=false

echo "== 2/5 BEiT v2 MIM pretraining (seed $SEED, $NPROC process(es)) against the tokenizer, then export to timm =="
logged mim launch pretrain.mim train beitv2_small_demo --tokenizer="$OUT/tokenizer/tokenizer.pt" \
  --run.output_dir="$OUT/mim" --run.seed="$SEED" --run.progress_bar=false

T=$OUT/transfer
M=$OUT/mosaics
mkdir -p "$T"
# The MIM stage's 12k training images and the whole 10k test split, seen whole (no centre crop at 28 px).
DATA='{"source": "fashion_mnist", "limit": 12000, "eval_images": 10000}'
# Frozen features are computed once per backbone into $T/features and shared by the probe and k-NN.
PROBE=(--data_cfg="$DATA" --eval_crop=1.0 --cache_dir="$T/features")
# 2,000 training mosaics from Fashion-MNIST's training split, 200 held-out ones from its test split, in grey like the
# pretraining images (docs/demo.md, "Segmentation"), drawn once (scripts/mosaics.sh). Stored raw (75 MB): no JPEG
# decoding competes with training for the cores.
MOSAIC_ARGS="--train=2000 --val=200 --palette=grey"
source scripts/mosaics.sh   # mosaics: draw and convert them, or reuse those drawn with MOSAIC_ARGS

pretrained_lane() {   # everything that reads the pretrained models, then the segmentation mosaics
  logged export one pretrain.mim export "$OUT/mim/mim.pt" "$OUT/mim/backbone_timm.safetensors"
  logged evaluate one pretrain.tokenizer evaluate "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/eval.json"
  logged encode one pretrain.tokenizer encode "$OUT/tokenizer/tokenizer.pt" --out="$OUT/tokenizer/test_tokens.npy" \
    --count=32 --png="$OUT/tokenizer/test_tokens.png"
  logged mim_evaluate one pretrain.mim evaluate "$OUT/mim" --out="$OUT/mim/eval.json"
  logged probe_pretrained one finetune.classify linear_probe "$OUT/mim/mim.pt" "${PROBE[@]}" \
    --out="$T/linear_probe_pretrained.json"
  logged knn_pretrained one finetune.classify knn "$OUT/mim/mim.pt" "${PROBE[@]}" --out="$T/knn_pretrained.json"
  logged finetune_pretrained launch finetune.classify train beitv2_small_demo_ft --init="$OUT/mim/mim.pt" \
    --run.output_dir="$T/finetune_pretrained" --data.eval_images=10000 --run.progress_bar=false
  mosaics   # here rather than in the other lane: it evens out the two lanes' lengths
}

baseline_lane() {   # the random-weight baselines and the tokenizer encoder's probe
  logged probe_random one finetune.classify linear_probe random --arch=beitv2_small_demo "${PROBE[@]}" \
    --out="$T/linear_probe_random.json"
  logged knn_random one finetune.classify knn random --arch=beitv2_small_demo "${PROBE[@]}" \
    --out="$T/knn_random.json"
  logged probe_tokenizer one finetune.classify linear_probe "$OUT/tokenizer/tokenizer.pt" --pooling=mean \
    "${PROBE[@]}" --out="$T/linear_probe_tokenizer_encoder.json"
  logged finetune_random launch finetune.classify train beitv2_small_demo_ft --init=random \
    --run.output_dir="$T/finetune_random" --data.eval_images=10000 --run.progress_bar=false
}

segment() {   # segment NAME RECIPE INIT: a segmentation recipe on the mosaics from the pretrained or a random backbone
  local path
  path=$([ "$3" = pretrained ] && echo "$OUT/mim/mim.pt" || echo random)
  logged "$1" one finetune.segment train "$2" --init="$path" \
    --data.source=beton --data.train_path="$M/training.beton" --data.eval_path="$M/validation.beton" \
    --run.output_dir="$T/$1" --run.progress_bar=false
}
segment_lane() {   # segment_lane INIT: UperNet fine-tuned from the backbone, then the linear probe of it frozen
  segment "segment_$1" upernet_beitv2_small_demo_mosaics "$1"
  segment "segment_linear_$1" linear_beitv2_small_demo_mosaics "$1"
}
segment_pretrained() { segment_lane pretrained; }
segment_random() { segment_lane random; }

echo "== 3/5 Evaluations, linear probes, k-NN and fine-tuning on held-out Fashion-MNIST (pretrained vs random), and" \
  "the segmentation mosaics: two lanes =="
lanes_start=$SECONDS
lanes pretrained_lane baseline_lane
echo "== 4/5 Segmentation on Fashion-MNIST mosaics, UperNet and the linear probe (pretrained vs random backbone, mIoU" \
  "on held-out): two lanes =="
lanes segment_pretrained segment_random
echo $((SECONDS - lanes_start)) > "$SECS_DIR/transfer_wall"   # steps 3-4 side by side: less than their sum

secs() { local t=0 n; for n in "$@"; do t=$((t + $(cat "$SECS_DIR/$n" 2>/dev/null || echo 0))); done; echo $t; }
cat > "$OUT/seconds.json" <<JSON
{"tokenizer": $(secs tokenizer evaluate encode), "mim": $(secs mim export mim_evaluate),
 "linear_probe": $(secs probe_pretrained probe_random probe_tokenizer), "knn": $(secs knn_pretrained knn_random),
 "finetune": $(secs finetune_pretrained finetune_random),
 "segment": $(secs mosaics convert_training convert_validation segment_pretrained segment_random),
 "segment_linear": $(secs segment_linear_pretrained segment_linear_random),
 "transfer_wall": $(secs transfer_wall), "total": $SECONDS}
JSON
echo "== 5/5 Report =="
$PY scripts/demo_report.py "$OUT"

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
res = json.load(open(f"{out}/results.json"))
for kind in ("linear_probe", "knn", "finetune"):
    row = res[kind]
    extra = f", tokenizer encoder {100 * row['tokenizer_encoder']:.1f}%" if "tokenizer_encoder" in row else ""
    print(f"{kind} top-1 on the 10,000 test images: pretrained {100 * row['pretrained']:.1f}%, random "
          f"{100 * row['random']:.1f}%{extra}")
for key, name in (("segmentation", "UperNet fine-tuned"), ("segmentation_linear", "linear probe, frozen")):
    seg = res.get(key, {})
    if seg:
        print(f"segmentation mIoU on the held-out mosaics ({name}): pretrained "
              f"{100 * seg.get('pretrained', float('nan')):.1f}%, random {100 * seg.get('random', float('nan')):.1f}%")
print(f"outputs in {out}/: results.json, report.md (plots in report/), tokenizer/tokenizer.pt, mim/mim.pt, "
      f"mim/backbone_timm.safetensors, transfer/*.json, transfer/finetune_*/classifier.pt, "
      f"transfer/segment_*/segmenter.pt, tensorboard logs in */tb")
PY
