#!/usr/bin/env bash
# dskd on one GPU, one prepared script (<= 8 minutes on an H200). Run on the device machine from the repo root:
#     bash benchmarks/gpu/fetch_wheels.sh                        # here first: the wheels the image lacks -> .whl/
#     device run: carry [".whl"], command "bash benchmarks/gpu/run.sh", timeout_s 560
# Sections, each under its own time limit, each printing its table and one JSON line (kept in $OUT when set):
#   1. kernel paths (benchmarks/gpu/kernel_paths.py): fused KD loss vs Liger (Triton) vs naive at bf16 V=128,256;
#      flash-attn 2 vs SDPA; dskd's PT sampler vs HF generate; a 4-bit (NF4) teacher vs bf16
#   2. a 50-step distillation at Llama-3.2-1B -> SmolLM2-135M shapes (bf16): `dskd plan`'s prediction vs
#      torch.cuda.max_memory_allocated, replicated and 4-bit teachers, with and without Joint-Teaching
#      (benchmarks/plan_accuracy.py --gpu)
# DSKD_GPU_SMOKE=1 runs the same sections at toy sizes on whatever device there is (CI's smoke test: no GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/dskd-gpu-bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
start=$(date +%s)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the packages fetch_wheels.sh carried
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PY'
import importlib, torch
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}" +
      (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
for name in ("deepspeed", "transformers", "liger_kernel", "flash_attn", "bitsandbytes", "mlflow", "datasets"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        print(f"  {name} missing ({type(exc).__name__}: {str(exc)[:120]})")
PY

section() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name (limit ${limit}s) ==="
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  tail -n 1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || echo "{\"section\": \"$name\", \"rc\": $rc}" > "$OUT/$name.json"
  echo "[run.sh] $name: exit $rc after $(( $(date +%s) - start ))s in all"
}

if [ "${DSKD_GPU_SMOKE:-0}" = 1 ]; then
  section kernels 300 "$PY" benchmarks/gpu/kernel_paths.py all --tiny --repeats 1
  section plan 300 "$PY" benchmarks/plan_accuracy.py --only 1:z0-kd --steps 1 --tiny-shapes --workdir "$OUT/plan-runs"
else
  section kernels 240 "$PY" benchmarks/gpu/kernel_paths.py all --repeats 5
  section plan 240 "$PY" benchmarks/plan_accuracy.py --gpu --workdir "$OUT/plan-runs"
fi
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {p.stem: json.loads(p.read_text() or "{}") for p in sorted(out.glob("*.json"))}
print(json.dumps({"benchmark": "gpu_run", **summary}, default=str))
PY
