#!/usr/bin/env bash
# The one script to run on a lent GPU machine (issues 7 and 8), from the repository root:
#   bash benchmarks/device_check.sh            # writes $OUT/ (or ./device-check/) gpu_check.json, launch.json, log.txt
#   SMALL=1 bash benchmarks/device_check.sh    # tiny shapes: checks the script itself on a CPU in about a minute
# gpu_check: rollout tok/s of HF sdpa generate, bridge generate and RolloutSampler, plus a train step,
# for the 135M and ~0.5B shapes (random weights). launch_check: `safesteer train` under torchrun
# on one card. Then gpu_check once more at the 135M shape with a float32 training step, to compare with
# the first run's `--precision auto` (bfloat16 autocast) step. Each part has its own time limit so one
# failure still leaves the others' numbers.
set -u
out="${OUT:-device-check}"
mkdir -p "$out"
python=${PYTHON:-python}
small=""
only_135m="--shape smollm2-135m"
if [ "${SMALL:-0}" = "1" ]; then small="--small"; only_135m=""; fi
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  $python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  timeout 330 $python benchmarks/gpu_check.py "$out/gpu_check.json" $small; echo "gpu_check exit $?"
  timeout 150 $python benchmarks/launch_check.py "$out/launch.json" --processes 1 $small; echo "launch_check exit $?"
  timeout 120 $python benchmarks/gpu_check.py "$out/gpu_check_float32.json" --precision float32 $only_135m $small
  echo "gpu_check float32 exit $?"
} 2>&1 | tee "$out/log.txt"
