#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: the exact-selection tests on CUDA (a CUDA selection is the
# CPU's, bit for bit), bf16-exact against fp32 training on the GPU (`bench/train_throughput.py`), where a CUDA step
# spends its time (`bench/step_profile.py`: kernels, launches and host waits per step), and the CUDA section of
# RESULTS.md (`bench/peers.py --device cuda`, written into OUT_DIR/RESULTS.md, a copy of bench/RESULTS.md).
# sparsify and the imports it needs that the machine lacks travel as wheels in .whl/ (pip download, see the device
# notes); nothing is fetched.
# Usage: bench/cuda_check.sh OUT_DIR [peers.py arguments...]
set -uo pipefail
out=${1:?usage: bench/cuda_check.sh OUT_DIR [peers.py arguments]}
shift
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/saes/test_exact_scores.py 2>&1 | tail -15 | tee "$out/tests.log"
for n in 24576 98304; do
    python3 bench/train_throughput.py --device cuda --n "$n" --precision bf16-exact --steps 20 --warmup 5 \
        2>&1 | tail -2 | tee -a "$out/throughput.log"
done
for precision in fp32 autocast; do
    python3 bench/step_profile.py --device cuda --n 4096 --precision "$precision" --steps 5 --warmup 10 \
        2>&1 | tee -a "$out/profile.log" | grep -v '^{'
done
cp bench/RESULTS.md "$out/RESULTS.md"
python3 bench/peers.py --device cuda --out "$out/RESULTS.md" "$@" 2>&1 | tee "$out/peers.log" | grep -v '^{'
