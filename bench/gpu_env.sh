# Sourced by the GPU scripts: output folder, wheels from .whl/ (if any) installed to /tmp/site, and what runs here.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
