#!/usr/bin/env bash
# Issue 8 on one H100: the restoration chain (SR, inpainting with the paper's unscaled concat, inpainting
# with scale_first_stage) and the shapes text/layout chain, side by side, stage 2 in bfloat16.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHON=python3 LDM_DATA=.device_data WORKDIRS=/tmp/w
nvidia-smi -L; python3 -c "import jax, grain, ml_collections, dm_pix, latent_diffusion.main, latent_diffusion.evaluate.conditional, latent_diffusion.evaluate.metrics, latent_diffusion.evaluate.shapes_parser, latent_diffusion.train.diffusion, latent_diffusion.train.autoencoder; print(jax.__version__, jax.devices())" || exit 1
mkdir -p $OUT/o/logs
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 20 > $OUT/o/logs/gpu.csv 2>&1 &
CHAINS="restoration shapes" SHAPES_TASKS="shapes_text shapes_layout" \
RESTORATION_TASKS="utkface_sr utkface_inpaint utkface_inpaint_scaled:utkface_inpaint" \
FLAGS_utkface_inpaint_scaled="--config.cond_stage.scale_first_stage=True" SR_EVAL_STEPS="50 200" \
EVAL_BATCH=128 EVAL_RESERVE=140 \
TRAIN_ARGS="--config.diffusion_train.batch_size=64 --config.diffusion_train.num_steps=30000 \
--config.diffusion_train.learning_rate=3e-4 --config.diffusion_train.checkpoint_every_steps=2000 \
--config.diffusion_train.sample_every_steps=100000 --config.dtype=bfloat16" \
  bash experiments/conditional.sh $OUT/o ${DEADLINE:-505}
kill %1 2>/dev/null
for t in /tmp/w/*/; do n=$(basename $t); cp $t/diffusion/metrics.jsonl $OUT/o/logs/${n}_metrics.jsonl 2>/dev/null; done
tar czf $OUT/o.tgz -C $OUT o && rm -rf $OUT/o
ls -la $OUT; tail -5 /tmp/w/*/diffusion/metrics.jsonl 2>/dev/null | cut -c1-200 | tail -40
