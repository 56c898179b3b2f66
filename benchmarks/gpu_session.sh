#!/usr/bin/env bash
# The lent-GPU session's script (one H200, no Ray or PyAV installed there, 15 minutes of device
# time in all): trains on the GPU what the 2-core CPU cannot, through `python -m pipeline.local`
# (the Ray jobs' training loops in one process), in two calls on the same warm machine:
#
#   bash benchmarks/gpu_session.sh start     # carry .whl (PyAV's wheel): install it, render
#                                            # the VAE videos, start the VAE fine-tunes (setsid)
#   bash benchmarks/gpu_session.sh dit SECS  # carry data/dit-pre: DiT runs for SECS seconds,
#                                            # bf16 + compile check, then collect everything
#
# What comes back under $OUT: the DiT exports, the VAE checkpoints' weights, logs.tar.gz.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
W=/tmp/tubelet-gpu
say() { echo "[gpu $(date +%T)] $*"; }

case "${1:-}" in
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi -L
  python3 -c "import torch, av; print('torch', torch.__version__, 'av', av.__version__)"
  mkdir -p $W
  # the shipped VAE's data (configs/train-vae/default.yaml): same seeds, same videos
  python3 -m pipeline synth --output $W/vae-train/shapes --num-videos 64 --seed 0 &&
  python3 -m pipeline synth --output $W/vae-train/photos --num-videos 48 --seed 0 --kind photos &&
  python3 -m pipeline synth --output $W/vae-heldout --num-videos 16 --seed 1 || exit 1
  # decoder-only fine-tunes of weights/vae-dc (encoder frozen: the demo DiT's latents stay
  # valid), 9x96x96 crops, batch 16; B adds the spatial-gradient loss
  common=(--input $W/vae-train --val $W/vae-heldout --device cuda
          --set init=weights/vae-dc.safetensors --set freeze_encoder=true --set "data.stages=[]"
          --set steps=1000000 --set data.batch_size=16 --set data.crop_size=96
          --set optim.lr=0.0003 --set optim.warmup_steps=100 --set optim.ema_decay=0.999
          --set checkpoint_every=1000 --set data.val_every=1000 --set log_every=200)
  setsid nohup python3 -m pipeline.local train-vae --output $W/vae-A "${common[@]}" \
    > $W/vae-A.log 2>&1 < /dev/null &
  setsid nohup python3 -m pipeline.local train-vae --output $W/vae-B "${common[@]}" \
    --set loss.grad_weight=0.5 > $W/vae-B.log 2>&1 < /dev/null &
  sleep 20
  tail -n 5 $W/vae-A.log $W/vae-B.log
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
  ;;
dit)
  secs=${2:-400}
  mkdir -p $W
  cfg=(--data data/dit-pre/latents --config configs/train/demo.yaml --device cuda
       --set steps=1000000 --set checkpoint_every=1000 --set log_every=500)
  # A: the recipe as shipped (global batch 8); B: batch 32
  python3 -m pipeline.local train --output $W/dit-A "${cfg[@]}" > $W/dit-A.log 2>&1 &
  a=$!
  python3 -m pipeline.local train --output $W/dit-B "${cfg[@]}" --set data.batch_size=32 \
    > $W/dit-B.log 2>&1 &
  b=$!
  # GPU paths nothing else checks: bf16 mixed precision + per-block torch.compile vs fp32
  # eager, 300 steps each, the same batches, side by side
  for v in fp32:float32:false bf16c:bfloat16:true; do
    IFS=: read -r name dtype comp <<< "$v"
    python3 -m pipeline.local train --output $W/check-$name "${cfg[@]}" --set steps=300 \
      --set parallel.param_dtype=$dtype --set parallel.compile=$comp --set log_every=100 \
      > $W/check-$name.log 2>&1 &
  done
  sleep "$secs"
  say "stopping the DiT runs"; kill $a $b; sleep 3
  tail -n 4 $W/dit-*.log $W/check-*.log
  pkill -f "pipeline.local train-vae"; sleep 3
  tail -n 8 $W/vae-*.log
  nvidia-smi --query-gpu=name,memory.used --format=csv
  cp $W/dit-A/export/model.safetensors $OUT/dit-A.safetensors
  cp $W/dit-B/export/model.safetensors $OUT/dit-B.safetensors
  for v in A B; do
    last=$(ls -d $W/vae-$v/checkpoints/step_* 2>/dev/null | grep -v '\.tmp$' | sort | tail -1)
    [ -n "$last" ] && cp "$last/vae.safetensors" $OUT/vae-$v.safetensors && say "vae-$v: $last"
  done
  cd $W && tar czf $OUT/logs.tar.gz *.log */metrics.jsonl */export/config.json \
    */export/train.yaml */run.json 2>/dev/null
  ls -la $OUT
  ;;
*) echo "usage: $0 start | dit SECS"; exit 2 ;;
esac
