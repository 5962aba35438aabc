#!/usr/bin/env bash
# The optional second GPU call: what does not fit in bench/gpu_check.sh's one call of 8 minutes. Builds as
# gpu_check.sh does, then compute-sanitizer racecheck, initcheck and synccheck over bench/gpu_smoke.py (every
# kernel, fast and plain variants, fastnn's kernels only, cupy's pool off) and the full-size bench, in at most
# 9 minutes. Same options, output folder and exit statuses as gpu_check.sh (see there):
#   bench/gpu_check_more.sh OUTDIR
#   bench/gpu_check_more.sh --rehearse [OUTDIR]
exec "$(dirname "$0")/gpu_check.sh" --more "$@"
