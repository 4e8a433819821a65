#!/usr/bin/env bash
# Run HERE (where pip reaches PyPI) before a device call: the wheels dskd needs that the H200 image lacks
# (/work/.library/device/KINDS.md lists the image's packages), for its Python 3.12, into .whl/ (git-ignored via
# .git/info/exclude). The device call then names .whl in `carry`; benchmarks/gpu/run.sh installs them there.
# deepspeed ships only an sdist: its wheel is built here with DS_BUILD_OPS=0 (pure Python; ops JIT-build there).
# flash-attn has no PyPI wheel (only an sdist that compiles for hours): run.sh reports it skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# What the image already has (torch, transformers, triton, numpy, pandas, pyarrow, ...): never carried.
IMAGE="torch transformers triton numpy pandas pyarrow safetensors tokenizers huggingface-hub accelerate pyyaml tqdm
requests matplotlib scipy sacrebleu psutil packaging filelock fsspec jinja2 markupsafe regex sentencepiece protobuf
click pillow typing-extensions networkx sympy mpmath urllib3 idna certifi charset-normalizer hf-xet xxhash aiohttp
aiosignal frozenlist multidict yarl attrs propcache aiohappyeyeballs ninja py-cpuinfo msgpack six python-dateutil
cloudpickle h11 anyio httpx httpcore werkzeug rich markdown-it-py mdurl pygments numba llvmlite contourpy cycler
fonttools kiwisolver pyparsing joblib threadpoolctl scikit-learn lxml portalocker colorama tabulate setuptools wheel
pip nvidia-ml-py einops"
# The runtime closure dskd's GPU benchmarks import (no MLflow server: tracking is off in them; mlflow-skinny
# gives the `mlflow` module), resolved for this interpreter, minus the image's packages.
python - "$IMAGE" > .whl/wanted.txt <<'PY'
import json, subprocess, sys
image = {n.lower().replace("_", "-") for n in sys.argv[1].split()}
wanted = ["deepspeed==0.19.8", "datasets", "mlflow-skinny==3.17.2", "rouge-score", "pydantic>=2.6", "gguf",
          "liger-kernel", "bitsandbytes", "fastapi", "uvicorn"]
report = json.loads(subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                                    "--quiet", "--report", "-", *wanted], capture_output=True, text=True,
                                   check=True).stdout)
for item in report["install"]:
    meta = item["metadata"]
    name = meta["name"].lower().replace("_", "-")
    if name not in image and not name.startswith(("nvidia-", "torch", "triton")):
        print(f"{name}=={meta['version']}")
PY
echo "[fetch_wheels] $(wc -l < .whl/wanted.txt) packages: $(tr '\n' ' ' < .whl/wanted.txt)"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
while read -r spec; do
  case "$spec" in
    deepspeed==*) DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "$spec" ;;
    *) python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         $PLATFORMS -d .whl "$spec" || echo "[fetch_wheels] no cp312 wheel for $spec (run.sh goes on without it)" ;;
  esac
done < .whl/wanted.txt
du -sh .whl
echo "[fetch_wheels] done: call the device with carry ['.whl'] and 'bash benchmarks/gpu/run.sh'"
