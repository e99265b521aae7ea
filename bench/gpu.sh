#!/usr/bin/env bash
# s3r on one GPU, as one prepared run of at most 7.5 minutes (the steps time out at 180 + 120 + 150 s):
#   1. bench/speed.py's comparison with transformers and torchaudio under bf16 autocast: base width with its 12
#      layers and large width with its 24, 8 utterances of 9-16 s (100 s of audio) zero-padded, 10 rounds;
#      peak GPU memory of each run (torch.cuda.max_memory_allocated above what was allocated before it)
#   2. s3r's model FLOP utilization (MFU) for the base weight-finetuning and S3-Router steps: FLOPs counted by
#      torch.utils.flop_counter, against the datasheet bf16 peak and against one 8192^3 bf16 matmul measured there
#   3. structured routes (issue 14, bench/structured.py): compact neuron/head models against the dense one, and a 2:4
#      route with its weights as torch semi-structured sparse tensors (cuSPARSELt/CUTLASS), base and large widths,
#      bf16, eval forward end to end and transformer layers alone; how many layers converted is in the log
# Through the device tool: run(command="bash bench/gpu.sh", timeout_s=480); results come back from $OUT.
# `bash bench/gpu.sh speed` runs steps 1-2 only, `bash bench/gpu.sh structured` step 3 only (about 2 minutes).
# Elsewhere: bash bench/gpu.sh  (writes bench/results/gpu/). Needs torch, transformers, torchaudio and one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT/base" "$OUT/large" "$OUT/structured"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SECONDS_8=16,15,14,13,12,11,10,9
ONLY=${1:-all}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import torch, transformers, torchaudio; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| torchaudio', torchaudio.__version__, '|', torch.cuda.get_device_name())"
  if [ "$ONLY" != structured ]; then
  timeout 180 python3 -m bench.speed --device cuda --dtype bfloat16 --threads 8 --configs base --layers 12 \
    --rounds 10 --seconds "$SECONDS_8" --mfu --skip-data --skip-ddp --out "$OUT/base" || echo "base run failed: $?"
  timeout 120 python3 -m bench.speed --device cuda --dtype bfloat16 --threads 8 --configs large --layers 24 \
    --rounds 10 --seconds "$SECONDS_8" --skip-data --skip-ddp --out "$OUT/large" || echo "large run failed: $?"
  fi
  if [ "$ONLY" != speed ]; then
  timeout 150 python3 -m bench.structured --device cuda --dtype bfloat16 --threads 8 --widths base,large \
    --rounds 10 --seconds "$SECONDS_8" --two-four --out "$OUT/structured" || echo "structured run failed: $?"
  fi
} 2>&1 | grep -v -E "^(Loading weights|Writing model shards)" | tee "$OUT/gpu.log"
