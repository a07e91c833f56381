#!/usr/bin/env bash
# The GPU checks, for a host with CUDA (CI is CPU-only; see docs/deployment.md, "GPUs"):
#   1. what torch sees (version, CUDA, GPUs);
#   2. tests/test_gpu.py: device: cuda rows against the CPU's (gossip, CHOCO, DIMAT,
#      disseminate), every agent tensor on the GPU, payloads from the CPU; with two or more
#      GPUs, two NCCL ranks against the simulator and a real torchrun --nproc-per-node 2;
#   3. benchmarks/device_speed.py: seconds per round on the CPU and on CUDA, same work.
# Usage: tools/gpu_check.sh [benchmark options, e.g. --hidden 1024 --rounds 4]
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = [torch.cuda.get_device_name(i) for i in range(n)]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {n} GPU(s): {names}")
if not n:
    raise SystemExit("no CUDA GPU visible: nothing to check here")
PYEOF
"$PY" -m pytest -v -rs tests/test_gpu.py tests/test_device.py
"$PY" benchmarks/device_speed.py "$@"
