#!/usr/bin/env bash
# One-shot GPU benchmarks: nnU-Net segmentation, the NSM fit and the DOSMA 2D planes on CUDA.
#
# Made for the team's lent GPU machine (python3 with torch, numpy, scipy, scikit-image, h5py,
# pandas; no internet; at most 64 MiB travels with the tree). Prepare here, once:
#
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     nnunetv2==2.8.1 dynamic_network_architectures==0.4.4 batchgenerators==0.25.5 \
#     batchgeneratorsv2==0.3.6 blosc2==4.15.0 ndindex==1.10.1 connected-components-3d==4.1.1 \
#     nibabel==5.4.2 simpleitk==2.5.7
#   pip wheel --no-deps -w .whl acvl_utils==0.2.6        # sdist only on PyPI (pure Python)
#   cp ../shared/fixtures/nsm/config.json .whl/nsm_config.json
#
# (versions: those of requirements.txt's environment). The SimpleITK wheel (53 MB) only fits
# the 64 MiB budget recompressed: unzip it and re-zip with `zip -9` or Python's ZIP_LZMA (same
# files). Imported but optional on this path, so not brought: pydicom, imagecodecs, IPython.
# Then run this script there with `.whl` carried: bash scripts/gpu_benchmarks.sh
# Outputs go to $OUT (or ./gpu_out): env.log, seg.{log,json}, nsm.{log,json}, dosma.{log,json}.
# The NSM benchmark uses its own CPU stand-ins for VTK / point_cloud_utils steps when those
# are missing (it says so per row); the latent optimisation runs on the GPU as in the product.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
T0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{
  nvidia-smi -L
  python3 -c "import sys, torch, numpy, scipy, skimage; print('python', sys.version.split()[0], \
'torch', torch.__version__, torch.cuda.get_device_name(0), 'numpy', numpy.__version__, \
'scipy', scipy.__version__, 'skimage', skimage.__version__)"
  echo "setup $((SECONDS - T0)) s"
} 2>&1 | tee "$OUT/env.log"
timeout -k 10 250 python3 scripts/benchmark_segmentation.py --device cuda \
  --out-json "$OUT/seg.json" 2>&1 | tee "$OUT/seg.log"
echo "segmentation rc=$? at $((SECONDS - T0)) s"
timeout -k 10 180 python3 scripts/benchmark_nsm.py --device cuda --repeat 2 \
  --config .whl/nsm_config.json --out-json "$OUT/nsm.json" 2>&1 | tee "$OUT/nsm.log"
echo "nsm rc=$? at $((SECONDS - T0)) s"
timeout -k 10 120 python3 scripts/benchmark_dosma2d.py --device cuda \
  --out-json "$OUT/dosma.json" 2>&1 | tee "$OUT/dosma.log"
echo "dosma rc=$? at $((SECONDS - T0)) s"
