#!/usr/bin/env bash
# Table 1's DINOv2-L row (GTA5 -> Cityscapes / BDD100K / Mapillary; paper: 68.2 / 63.3 / 68.0 mIoU) with the
# paper's protocol: Mask2Former head on blocks 7, 11, 15, 23 (Rein's), DR-FIM scores on GTA5, masked fine-tuning
# of 1% -> 5% of the backbone for 40k steps (tune --recipe rein-512), slide evaluation 512/341.
#
# Needs: pip install 'fisherscan[mask2former]'; the official dinov2_vitl14_pretrain.pth; the data sets in the
# layouts of docs/method.md (GTA5 labels as trainIds or raw labelIds, Cityscapes, BDD100K, Mapillary v1.2).
# One GPU; tune under torchrun for several (the global batch is --batch-size x GPUs: use --batch-size 1 on 4 GPUs).
# Every step resumes after an interruption: run the script again.
set -euo pipefail

WEIGHTS=${WEIGHTS:-checkpoints/dinov2_vitl14_pretrain.pth}
GTA=${GTA:-data/gta}
CITYSCAPES=${CITYSCAPES:-data/cityscapes}
BDD=${BDD:-data/bdd100k}
MAPILLARY=${MAPILLARY:-data/mapillary}
OUT=${OUT:-runs/gta_dinov2l}
SEED=${SEED:-0}
mkdir -p "$OUT"

# 1. Warm the Mask2Former head up on the frozen backbone (Algorithm 1 step 1), then the per-image Fisher and
#    DR-FIM of every backbone element on 1000 GTA5 crops (scores + the warmed head beside them).
if [ ! -f "$OUT/scores.safetensors" ]; then
  fisherscan score --model dinov2_vitl14 --weights "$WEIGHTS" --data "$GTA" --layout gta5 \
      --decoder mask2former --crop 512 --batch-size 4 --warmup-steps 2000 --warmup-lr 1e-4 \
      --images 1000 --seed "$SEED" --out "$OUT/scores.safetensors"
fi

# 2. Masked fine-tuning (Algorithm 1 step 3) with Rein's protocol: crop 512, batch 4, AdamW 1e-4 / 0.05,
#    poly 0.9, 40k steps, resize 0.5-2.0 + class-balanced crop + flip + photometric distortion.
resume=()
[ -f "$OUT/tune/checkpoint.safetensors" ] && [ ! -f "$OUT/tune/model.safetensors" ] && resume=(--resume)
if [ ! -f "$OUT/tune/model.safetensors" ]; then
  # the model, its weights, the GTA5 folder and layout and the warmed head come from the scores file
  fisherscan tune --recipe rein-512 --scores "$OUT/scores.safetensors" --strategy drfim --delta-min 1% \
      --delta-max 5% --save-every 1000 --seed "$SEED" --out "$OUT/tune" "${resume[@]}"
fi

# 3. Slide evaluation (512 windows every 341 pixels) at Rein's test sizes: Cityscapes val at 1024x512, BDD100K at
#    its 1280x720, Mapillary val at half size.
fisherscan eval --checkpoint "$OUT/tune" --data "$CITYSCAPES" --layout cityscapes --resize 1024x512 \
    --crop 512 --stride 341 --out "$OUT/eval/cityscapes"
fisherscan eval --checkpoint "$OUT/tune" --data "$BDD" --layout bdd100k --crop 512 --stride 341 \
    --out "$OUT/eval/bdd100k"
fisherscan eval --checkpoint "$OUT/tune" --data "$MAPILLARY" --layout mapillary --resize 0.5 \
    --crop 512 --stride 341 --out "$OUT/eval/mapillary"
