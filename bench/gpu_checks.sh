#!/usr/bin/env bash
# The checks to run when a session is lent a GPU, in one call, ending inside ~10 minutes:
#
#   OUT=/tmp/gpu bench/gpu_checks.sh
#
# 1. bench/throughput.py alone on the device (timings: nothing else runs meanwhile);
# 2. then, side by side on the one GPU (quality, not timings):
#    - the `gpu`-marked tests of tests/test_restore.py and tests/test_batched_fit.py,
#    - bench/levin.py, `cider` at $ITERATIONS on each image of the 6-image subset,
#    - bench/microscopy.py, `cider_curve` (defaults, scored every 100 iterations) per case, or,
#      with SWEEP=bench/sweeps/<spec>.json, that sweep (bench/microscopy_sweep.py, JOBS processes).
# Everything lands in $OUT/gpu_run.tgz (logs, JSON, tables); bench/README.md says how the
# committed GPU tables were made from it. Needs the Levin data at ../shared/data/levin and
# the microscopy cases in $CACHE (bench/microscopy_data.py load_case writes them).
# DEVICE=cpu ITERATIONS=4 LIMIT=120 is a smoke run of the script itself on a CPU.
# Other knobs: THROUGHPUT=0 skips step 1; LEVIN_CASES="im1_k2 ..." (any of the 32) with
# LEVIN_JOBS workers taking them in turn (each image is stored when done, so a cut run resumes);
# SWEEP_ITERATIONS overrides the sweep spec's iterations (smoke runs).
# CARRY=.devcarry (built here by bench/gpu_carry.sh, carried to the device): install its wheels
# into /tmp/site, use its Levin data and case cache.
set -u
if [ -n "${CARRY:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/whl/*.whl || exit
    export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    mkdir -p ../shared/data
    [ -e ../shared/data/levin ] || ln -s "$PWD/$CARRY/data/levin" ../shared/data/levin
    CACHE=${CACHE:-$CARRY/cache}
fi
out=${OUT:-/tmp/gpu_checks}
run="$out/run"
mkdir -p "$run/logs"
iterations=${ITERATIONS:-1000}
limit=${LIMIT:-330}
device=${DEVICE:-cuda}
cache=${CACHE:-.bench_cache}
export PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%T)] $*" | tee -a "$run/logs/steps.txt"; }

{
    nvidia-smi || true
    python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    python3 -c "import torch; print(torch.cuda.get_device_name())" || true
} >"$run/logs/env.txt" 2>&1

if [ "${THROUGHPUT:-1}" = 1 ]; then
    stamp "throughput"
    throughput_args=()
    [ "$device" = cpu ] && throughput_args=(--gpu-cases --quick --only 2d-64)
    timeout "${THROUGHPUT_LIMIT:-190}" python3 bench/throughput.py --out "$run" "${throughput_args[@]}" \
        >"$run/logs/throughput.log" 2>&1
    stamp "throughput rc=$?"
fi

export OMP_NUM_THREADS=1 # many processes share the CPU cores below
timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_restore.py tests/test_batched_fit.py \
    >"$run/logs/gpu_tests.txt" 2>&1 &
deadline=$((SECONDS + limit))
levin_queue() { # one worker: its cases one after another, each stored when done
    for case in "$@"; do
        left=$((deadline - SECONDS))
        [ "$left" -gt 20 ] || return
        timeout "$left" python3 bench/levin.py --subset all --methods cider --iterations "$iterations" \
            --cases "$case" --device "$device" --threads 1 --output "$run/levin_$case.md" \
            >"$run/logs/levin_$case.log" 2>&1
    done
}
read -r -a levin_cases <<<"${LEVIN_CASES:-im1_k1 im1_k4 im2_k3 im3_k5 im3_k8 im4_k7}"
levin_jobs=${LEVIN_JOBS:-${#levin_cases[@]}}
for ((worker = 0; worker < levin_jobs; worker++)); do
    share=()
    for ((i = worker; i < ${#levin_cases[@]}; i += levin_jobs)); do share+=("${levin_cases[i]}"); done
    [ ${#share[@]} -gt 0 ] && levin_queue "${share[@]}" &
done
if [ -n "${SWEEP:-}" ]; then # e.g. SWEEP=bench/sweeps/3d_data_term.json: settings x cases instead
    sweep_args=()
    [ -n "${SWEEP_ITERATIONS:-}" ] && sweep_args=(--iterations "$SWEEP_ITERATIONS")
    timeout "$limit" python3 bench/microscopy_sweep.py "$SWEEP" --jobs "${JOBS:-15}" --cache "$cache" \
        --out "$run/sweep" "${sweep_args[@]}" >"$run/logs/sweep.log" 2>&1 &
else
    for case in bars gauss3d_low lightsheet3d_low lightsheet3d_high widefield3d_low widefield3d_high \
        fluo2d_low plankton2d; do
        timeout "$limit" python3 bench/microscopy.py --cases "$case" --methods cider_curve --iterations "$iterations" \
            --device "$device" --cache "$cache" --out "$run" --tag "_$case" --progress "$run/progress" >"$run/logs/microscopy_$case.log" 2>&1 &
    done
fi
stamp "waiting for $(jobs -p | wc -l) processes"
wait
stamp "done"
cp -r bench/results/levin "$run/levin_json"
tar czf "$out/gpu_run.tgz" -C "$out" run
cp "$run/logs/steps.txt" "$run/logs/gpu_tests.txt" "$out/" 2>/dev/null
rm -rf "$run"
