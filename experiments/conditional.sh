#!/usr/bin/env bash
# Trains every small conditional config and measures whether its samples obey their conditions
# (eval_conditional), with sample-mode grids from command-line conditions (written to OUT/inputs).
# Independent chains run in parallel (one accelerator, or the CPU cores); each training run stops at
# its config's num_steps or at the DEADLINE (a clean preemption: the last checkpoint is kept and
# evaluated).
#
#   experiments/conditional.sh OUT [DEADLINE_SECONDS]
#
# OUT receives results/<task>*.json, grids/*.png and logs/; the workdirs go to $WORKDIRS (default
# OUT/workdirs). Data: $LDM_DATA (utkface64). EVAL_N conditions per evaluation (256), EVAL_BATCH
# samples per compiled sampler call (64). QUICK=1 shrinks every budget to a few steps (a smoke run).
# CHAINS picks the chains to run (default "shapes utkface restoration"), SHAPES_TASKS the tasks of
# the shapes chain; the measuring networks are trained only for the chains that need them.
set -uo pipefail
OUT=$(realpath -m "$1"); DEADLINE=${2:-100000}
START=$(date +%s)
W=${WORKDIRS:-$OUT/workdirs}; mkdir -p "$W" "$OUT/results" "$OUT/grids" "$OUT/logs"
PY=${PYTHON:-python}
MAIN="$PY -m latent_diffusion.main"
EVAL_N=${EVAL_N:-256}
EVAL_BATCH=${EVAL_BATCH:-64}
if [[ "${QUICK:-0}" == 1 ]]; then
  STEPS="--config.diffusion_train.num_steps=4 --config.diffusion_train.sample_every_steps=4 --config.sample.num_steps=4"
  AE_STEPS="--config.autoencoder_train.num_steps=4 --config.autoencoder_train.eval_every_steps=0"
  PARSER_STEPS=5; CLASSIFIER_STEPS=5; EVAL_N=8; EVAL_BATCH=8; EVAL_STEPS="--config.sample.num_steps=4"
  SR_EVAL_STEPS=4
else
  STEPS=""; AE_STEPS=""; PARSER_STEPS=${PARSER_STEPS:-3000}; CLASSIFIER_STEPS=${CLASSIFIER_STEPS:-1500}
  EVAL_STEPS=""
fi
CLI_STEPS=""; [[ "${QUICK:-0}" == 1 ]] && CLI_STEPS="--config.sample.num_steps=4"
EVAL_STEPS="$EVAL_STEPS --config.sample.batch_size=$EVAL_BATCH"
STEPS="$STEPS ${TRAIN_ARGS:-}"  # TRAIN_ARGS: more --config flags for every stage-2 training run

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# run NAME CMD...: the command with the time left before the deadline minus a reserve for evaluation.
train() { local name=$1 reserve=$2; shift 2; timeout -k 30 -s TERM $(( $(left) - reserve )) "$@" > "$OUT/logs/$name.log" 2>&1 \
  || echo "$name: exit $?" >> "$OUT/logs/status.txt"; }
run() { local name=$1; shift; timeout -k 30 -s TERM $(( $(left) > 5 ? $(left) - 5 : 1 )) "$@" > "$OUT/logs/$name.log" 2>&1 \
  || echo "$name: exit $?" >> "$OUT/logs/status.txt"; }
wait_for() { while [[ ! -e "$1" ]] && (( $(left) > 20 )); do sleep 2; done; }
collect() {  # collect WORKDIR: the eval JSONs and grids of one workdir, named after it
  for f in "$W/$1"/diffusion/eval_*.json; do [[ -e "$f" ]] && cp "$f" "$OUT/results/$1_$(basename "$f")"; done
  for f in "$W/$1"/diffusion/samples/*.png; do [[ -e "$f" ]] && cp "$f" "$OUT/grids/$1_$(basename "$f")"; done
}
EVAL_RESERVE=${EVAL_RESERVE:-150}

# Command-line conditions for sample mode: a layout JSON, and a face at 16, 32 and 64 px with a mask.
mkdir -p "$OUT/inputs"
$PY - "$OUT/inputs" "${LDM_DATA:-../shared/data}/utkface64/val" <<'PYTHON' || echo "inputs: exit $?" >> "$OUT/logs/status.txt"
import json, os, sys
from PIL import Image, ImageDraw
out, val = sys.argv[1:]
boxes = [{'class': 'circle', 'box': [0.1, 0.1, 0.45, 0.45]}, {'class': 'square', 'box': [0.55, 0.5, 0.9, 0.85]}]
json.dump(boxes, open(os.path.join(out, 'layout.json'), 'w'))
face = Image.open(os.path.join(val, sorted(os.listdir(val))[3])).convert('RGB').resize((64, 64), Image.BICUBIC)
face.save(os.path.join(out, 'face64.png'))
for side in (16, 32):
  face.resize((side, side), Image.BICUBIC).save(os.path.join(out, f'face{side}.png'))
mask = Image.new('L', (64, 64), 0)
draw = ImageDraw.Draw(mask)
draw.rectangle([18, 22, 46, 38], fill=255)
draw.line([(5, 58), (30, 45), (60, 55)], fill=255, width=6)
mask.save(os.path.join(out, 'mask64.png'))
PYTHON
# cli TASK FLAGS...: a sample-mode grid of 8 from command-line conditions (the file names say which);
# CLI_WORKDIR (default TASK) names the workdir when one config trains several.
cli() { local task=$1 dir=${CLI_WORKDIR:-$1}; shift; run ${dir}_cli $MAIN --config=configs/$task.py --workdir="$W/$dir" \
    --config.mode=sample --config.sample.num_samples=8 --config.sample.batch_size=8 $CLI_STEPS "$@"; }
cli_for() {  # cli_for TASK [FLAGS...]
  local task=$1; shift
  case $task in
    shapes_text) cli $task "--config.sample.prompt=a red circle left of a blue square|a green star" "$@" ;;
    shapes_layout) cli $task --config.sample.layout="$OUT/inputs/layout.json" "$@" ;;
    utkface_class) cli $task --config.sample.class_label=2 "$@" ;;
    utkface_sr) cli $task --config.sample.image="$OUT/inputs/face32.png" "$@" ;;  # 32 px -> 128 px
    utkface_inpaint) cli $task --config.sample.image="$OUT/inputs/face64.png" --config.sample.mask="$OUT/inputs/mask64.png" "$@" ;;
    *) cli $task "$@" ;;  # held-out conditions
  esac
}

CHAINS=" ${CHAINS:-shapes utkface restoration} "

# Measuring networks, trained by our code: the shapes parser (synthetic set) and a UTKFace race classifier.
[[ $CHAINS == *" shapes "* ]] && \
  run parser $PY -m latent_diffusion.evaluate.shapes_parser --out="$W/parser.msgpack" --steps=$PARSER_STEPS &
[[ $CHAINS == *" utkface "* ]] && \
  run classifier $PY -m latent_diffusion.evaluate.classifier --data=utkface64 --out="$W/utk_classifier.msgpack" \
      --steps=$CLASSIFIER_STEPS &

# Stage 1 of the synthetic tasks: configs/default.py's autoencoder, shared by three workdirs.
shapes_chain() {
  train shapes_ae $(( EVAL_RESERVE + 120 )) $MAIN --config=configs/default.py --workdir="$W/shapes_ae" \
      --config.mode=train_autoencoder $AE_STEPS
  for task in ${SHAPES_TASKS:-shapes_text shapes_layout shapes_semantic}; do
    mkdir -p "$W/$task" && cp -r "$W/shapes_ae/autoencoder" "$W/$task/"
    ( train $task $EVAL_RESERVE $MAIN --config=configs/$task.py --workdir="$W/$task" --config.mode=train_diffusion $STEPS
      wait_for "$W/parser.msgpack"
      scales="1.0"; [[ $task != shapes_semantic ]] && scales="1.0 3.0"
      for scale in $scales; do
        run ${task}_eval_cfg$scale $MAIN --config=configs/$task.py --workdir="$W/$task" --config.mode=eval_conditional \
            --config.eval.parser_path="$W/parser.msgpack" --config.eval.num_images=$EVAL_N \
            --config.sample.guidance_scale=$scale $EVAL_STEPS
      done
      cli_for $task
      collect $task ) &
  done
  wait
}

utkface_chain() {  # class-conditional (utkface64_f4's stage 1)
  train utkface_class $EVAL_RESERVE $MAIN --config=configs/utkface_class.py --workdir="$W/utkface_class" \
      $AE_STEPS $STEPS
  wait_for "$W/utk_classifier.msgpack"
  for scale in 1.0 3.0; do
    run utkface_class_eval_cfg$scale $MAIN --config=configs/utkface_class.py --workdir="$W/utkface_class" \
        --config.mode=eval_conditional --config.eval.classifier_path="$W/utk_classifier.msgpack" \
        --config.eval.num_images=$EVAL_N --config.sample.guidance_scale=$scale $EVAL_STEPS
  done
  cli_for utkface_class
  collect utkface_class
}

# RESTORATION_TASKS: workdirs of the restoration chain, each NAME or NAME:CONFIG, with more --config
# flags for every run of that workdir in $FLAGS_<NAME> (e.g. an ablation of one config beside it).
# SR_EVAL_STEPS: the DDIM step counts of the super-resolution evaluation; inpainting is evaluated with
# and without sample.keep_known_latents (the paper's masked DDIM on top of the concat condition).
# IMAGE_GUIDANCE: the sample.image_guidance_scale values each evaluation is run with (default 0: off).
# INPAINT_KNOWN: the sample.keep_known_latents values inpainting is evaluated with (default "False True").
# EVAL_ARGS: more --config flags for every restoration evaluation (e.g. --config.eval.samples_per_condition=4).
# RESTORATION_STEPS (e.g. 5,10,25,50): each restoration evaluation becomes experiments/restoration_steps.py,
# which chooses the DDIM step count on EVAL_N training faces and measures it and the default held out;
# with RESTORATION_GUIDANCE (e.g. 0,0.03) it chooses the pair of a count and an image guidance scale.
# RESTORATION_CLI=0 skips their sample-mode grids.
restoration_chain() {  # super-resolution and inpainting share the KL-f2 stage 1
  train restoration_ae $(( EVAL_RESERVE + 120 )) $MAIN --config=configs/utkface_sr.py --workdir="$W/utkface_sr" \
      --config.mode=train_autoencoder $AE_STEPS
  for spec in ${RESTORATION_TASKS:-utkface_sr utkface_inpaint}; do
    local name=${spec%%:*} task=${spec#*:}
    local flags_var="FLAGS_$name"; local flags=${!flags_var:-}
    [[ $name != utkface_sr ]] && mkdir -p "$W/$name" && cp -r "$W/utkface_sr/autoencoder" "$W/$name/"
    ( train $name $EVAL_RESERVE $MAIN --config=configs/$task.py --workdir="$W/$name" --config.mode=train_diffusion \
          $STEPS $flags
      if [[ $task == utkface_inpaint ]]; then variants="${INPAINT_KNOWN:-False True}"; else variants="${SR_EVAL_STEPS:-50}"; fi
      for variant in $variants; do for guidance in ${IMAGE_GUIDANCE:-0}; do
        if [[ $task == utkface_inpaint ]]; then extra="--config.sample.keep_known_latents=$variant"
        else extra="--config.sample.num_steps=$variant"; fi
        local measured="--config.eval.num_images=$EVAL_N $EVAL_STEPS $flags $extra --config.sample.image_guidance_scale=$guidance ${EVAL_ARGS:-}"
        if [[ -n "${RESTORATION_STEPS:-}" ]]; then
          run ${name}_steps_${variant}_ig$guidance $PY experiments/restoration_steps.py --config=configs/$task.py \
              --workdir="$W/$name" --out="$OUT/results/${name}_steps_${variant}_ig$guidance" --steps=$RESTORATION_STEPS \
              ${RESTORATION_GUIDANCE:+--image_guidance_scales=$RESTORATION_GUIDANCE} \
              --selection_path="${LDM_DATA:-../shared/data}/utkface64/train" --selection_images=$EVAL_N $measured
        else
          run ${name}_eval_${variant}_ig$guidance $MAIN --config=configs/$task.py --workdir="$W/$name" \
              --config.mode=eval_conditional $measured
        fi
      done; done
      [[ "${RESTORATION_CLI:-1}" == 1 ]] && CLI_WORKDIR=$name cli_for $task $flags
      collect $name ) &
  done
  wait
}

for chain in $CHAINS; do ${chain}_chain & done
wait
cp "$W"/*/diffusion/metrics.jsonl "$OUT/logs/" 2>/dev/null
for task in shapes_text shapes_layout shapes_semantic utkface_class utkface_sr utkface_inpaint; do
  [[ -e "$W/$task/diffusion/metrics.jsonl" ]] && cp "$W/$task/diffusion/metrics.jsonl" "$OUT/logs/${task}_metrics.jsonl"
done
echo "finished in $(( $(date +%s) - START )) s" | tee -a "$OUT/logs/status.txt"
