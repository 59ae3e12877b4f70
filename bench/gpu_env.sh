# Sourced by the GPU scripts: output folder, wheels from .whl/ (if any) installed to /tmp/site, and what runs here.
# The device machine has torch and timm but no registry access: fill .whl/ here first (git ignores it) and carry it,
#   .venv/bin/pip wheel -q --no-deps -w .whl deepspeed==0.19.8    # an sdist: built here, pure Python
#   .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl hjson==3.1.0 fire==0.7.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 tensorboardx==2.6.5
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
