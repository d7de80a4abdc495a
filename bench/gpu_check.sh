#!/usr/bin/env bash
# `make gpu-check`: the GPU tier (pytest -m gpu) and the GPU benchmark, on a host with CUDA torch.
#
# Where the locked environment exists (.venv) it runs there. Elsewhere, on a GPU host with its own
# Python 3.12 + CUDA torch and no package registry, it uses that Python (its torch, transformers,
# accelerate, peft, ...) and installs what it lacks from the wheel folder `make gpu-wheels`
# prepared (.gpu-wheels, carried with the working tree) into a private target folder: nothing
# is downloaded and the host's own packages are left as they are.
#
# Exit codes: 0 both parts passed; 2 no CUDA device (nothing measured); otherwise the first failure.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${KUBETUNE_GPU_WHEELS:-$REPO/.gpu-wheels}
SITE=${KUBETUNE_GPU_SITE:-/tmp/kubetune-gpu-site}
cd "$REPO"
started=$SECONDS

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
  echo "gpu-check: the locked environment (.venv)"
else
  PY=${PYTHON:-python3}
  if [ ! -d "$WHEELS" ]; then
    echo "gpu-check: $PY has no kubetune environment and $WHEELS is missing: run 'make gpu-wheels' first" >&2
    exit 1
  fi
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$SITE:$REPO/operator:$REPO/trainer:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu-check: $($PY --version) at $(command -v "$PY") with $(ls "$WHEELS"/*.whl | wc -l) carried wheels" \
       "($(du -sm "$WHEELS" | cut -f1) MiB) in $SITE"
fi

"$PY" - <<'EOF' || exit 1
import importlib.metadata as metadata
import torch
names = ["torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "pydantic", "boto3"]
print("versions: " + ", ".join(f"{n} {metadata.version(n)}" for n in names))
import kubetune_trainer.assembly  # noqa: F401  (the trainer imports with these versions)
print(f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
EOF

export PYTHONUNBUFFERED=1
# -W default: the host's package versions are not the lock's; their deprecation notices are not ours to fail on.
"$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -W default -q -rs --durations=0
tier=$?
tier_seconds=$((SECONDS - started))
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device is visible, so the tier skipped (above) and the benchmark did not run"
  exit 2
fi
"$PY" -m bench.gpu_throughput
bench=$?
echo "gpu-check: tier exit $tier (${tier_seconds} s), benchmark exit $bench; $((SECONDS - started)) s in all"
[ "$tier" -eq 0 ] && exit "$bench"
exit "$tier"
