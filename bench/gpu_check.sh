#!/usr/bin/env bash
# The GPU path, checked on a machine with an NVIDIA GPU and onnxruntime-gpu (docs/speed.md, "On a GPU").
#
#   bash bench/gpu_check.sh [OUT_DIR]      # JSON results in OUT_DIR (default docs/bench)
#
# 1. python -m bench.gpu_check: the engine on CUDA with the bundled GPU model (MODEL_PATH unset), against
#    the same file on CPU: which file and provider serve, the weight casts folded, logits, bits/char
#    (data/both/val.txt when prepared, else README.md) and the text of the same seeds.
# 2. python -m bench.generation --provider cuda on that file: speed of one stream and of 1-256 streams.
# 3. Only where torch sees the GPU: python -m bench.generation --provider cuda on its random 2x256 LSTM,
#    fp32 against fp16 (its export verifies fp16 against PyTorch on CUDA).
#
# Needs the runtime and onnxruntime-gpu, not torch (steps 1 and 2):
#   pip install . tqdm && pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu>=1.20,<2'
# Exit code: that of the first step that failed; 2 when no CUDA provider is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-docs/bench}
MODEL=bot/assets/speechbot-cuda.onnx

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "gpu_check: no nvidia-smi"
"$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
"$PYTHON" -m bench.gpu_check --json "$OUT/gpu_check.json"
# One lane and one thread: the engine takes one lane on a GPU, and threads only matter on CPU.
"$PYTHON" -m bench.generation --provider cuda --model "$MODEL" --threads 1 --lanes 1 --repeats 3 \
    --json "$OUT/generation-cuda-bundled.json"
if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    "$PYTHON" -m bench.generation --provider cuda --threads 1 --lanes 1 --repeats 3 \
        --json "$OUT/generation-cuda-2x256.json"
else
    echo "gpu_check: torch with CUDA is not installed: skipped the fp32-against-fp16 run of bench.generation"
fi
echo "gpu_check: all done; results in $OUT"
