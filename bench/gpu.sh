#!/usr/bin/env bash
# The GPU benchmark in one device call (<= 8 minutes): `bash bench/gpu.sh`.
#
# Needs python3 with a CUDA torch; installs this project (pip install -e .) only when its
# imports fail. Runs `python -m bench --gpu --quick` (compute limit in fp16 + channels_last +
# cudnn.benchmark, the naive server, OrthoVision Serve with the gpu preset pinned to fixed
# replica counts) and prints the same `RESULT {json}` last line as the CPU harness. The JSON
# is also written to $OUT/bench-gpu.json when $OUT is set (else out/bench-gpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
fi
if ! "$PY" -c "import ray.serve, timm, fastapi, pydicom, orthovision, serve" >/dev/null 2>&1; then
  echo "[gpu.sh] installing the project (pip install -e .) ..."
  "$PY" -m pip install -q -e . 2>&1 | tail -n 5 || {
    echo "[gpu.sh] pip install failed: the device has no package index?" >&2
    exit 3
  }
fi
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("[gpu.sh] torch", torch.__version__, "on", torch.cuda.get_device_name(0), flush=True)
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
OUT_DIR="${OUT:-out}"
mkdir -p "$OUT_DIR"
# The harness stops its own servers; `timeout` is the backstop for the 8-minute budget.
exec timeout --signal=INT --kill-after=30 450 \
  "$PY" -m bench --gpu --quick --json "$OUT_DIR/bench-gpu.json" "$@"
