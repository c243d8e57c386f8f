#!/usr/bin/env bash
# Issue 8 on one H100: the restoration chain alone (KL-f2 stage 1, then utkface_sr and utkface_inpaint side
# by side), stage 2 in bfloat16 with 7 grain worker processes each. The earlier H100 runs fed stage 2 from
# the main process (data.worker_count 0), which caps the pipeline at about 20 (SR) and 8 (inpainting)
# batches of 64 per second: the rates they trained at. Each model is evaluated on 256 utkface64/val faces,
# DDIM-50 (eta 0), 4 samples per face (the first alone, and the mean of the 4), without and with the
# image-space guider.
#   files: .whl/ (grain, array_record, portpicker, ml_collections, dm_pix wheels), .device_data/utkface64;
#   prepare.sh (beside this file) builds both on the CPU machine, to carry as [".whl", ".device_data"].
#   RESTORATION_TASKS (default "utkface_sr utkface_inpaint"), IMAGE_GUIDANCE (default "0 1") and WORKERS
#   (grain workers per model, default 7) pick a smaller run, e.g. inpainting alone:
#   RESTORATION_TASKS=utkface_inpaint IMAGE_GUIDANCE=0 WORKERS=14 DEADLINE=505 bash .../run.sh
#   RESTORATION_STEPS=5,10,25,50 chooses the DDIM step count on training faces (experiments/restoration_steps.py)
#   (RESTORATION_GUIDANCE=0,0.03: the pair of a count and an image guidance scale), and RESTORATION_CLI=0
#   skips the sample-mode grids (see experiments/conditional.sh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHON=python3 LDM_DATA=.device_data WORKDIRS=/tmp/w
nvidia-smi -L; nproc; python3 -c "import jax, grain, ml_collections, dm_pix, skimage, latent_diffusion.main, latent_diffusion.evaluate.conditional, latent_diffusion.train.diffusion; print(jax.__version__, jax.devices())" || exit 1
mkdir -p $OUT/o/logs
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > $OUT/o/logs/gpu.csv 2>&1 &
CHAINS=restoration RESTORATION_TASKS="${RESTORATION_TASKS:-utkface_sr utkface_inpaint}" SR_EVAL_STEPS=50 INPAINT_KNOWN=True \
IMAGE_GUIDANCE="${IMAGE_GUIDANCE:-0 1}" EVAL_ARGS="--config.eval.samples_per_condition=4" \
EVAL_N=256 EVAL_BATCH=256 EVAL_RESERVE=${EVAL_RESERVE:-170} \
TRAIN_ARGS="--config.diffusion_train.batch_size=64 --config.diffusion_train.num_steps=100000 \
--config.diffusion_train.learning_rate=3e-4 --config.diffusion_train.checkpoint_every_steps=5000 \
--config.diffusion_train.sample_every_steps=1000000 --config.dtype=bfloat16 --config.data.worker_count=${WORKERS:-7}" \
  bash experiments/conditional.sh $OUT/o ${DEADLINE:-505}
kill %1 2>/dev/null
for t in /tmp/w/*/; do n=$(basename $t); cp $t/diffusion/metrics.jsonl $OUT/o/logs/${n}_metrics.jsonl 2>/dev/null;
  cp $t/autoencoder/metrics.jsonl $OUT/o/logs/${n}_autoencoder_metrics.jsonl 2>/dev/null; done
cat $OUT/o/logs/status.txt 2>/dev/null; tail -n 2 $OUT/o/logs/*_metrics.jsonl | cut -c1-240
python3 - $OUT/o/results <<'PYTHON'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
  r = json.loads(path.read_text())
  print(path.name, 'step', r.get('step'), {k: v for k, v in r.items() if isinstance(v, dict) and k != 'lpips'})
for path in sorted(pathlib.Path(sys.argv[1]).glob('*/results.json')):  # restoration_steps.py
  r = json.loads(path.read_text())
  for split in ('selection', 'eval'):
    for name, run in r[split].items():
      print(path.parent.name, split, name, 'step', run['step'], 'chosen' if name == r['chosen'] else '',
            {k: v[r['score']] for k, v in run.items() if isinstance(v, dict) and r['score'] in v})
PYTHON
tar czf $OUT/o.tgz -C $OUT o && rm -rf $OUT/o; ls -la $OUT
