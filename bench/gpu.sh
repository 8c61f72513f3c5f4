#!/usr/bin/env bash
# The GPU bench in one call, on a fresh machine with one CUDA GPU and this repository copied (run from its root):
#   bash bench/gpu.sh                 # results in $OUT (default ./gpu-results): gpu-results.json, gpu-results.txt
# QLoRA 4-bit and LoRA bf16 on a Mistral-7B-shaped random model: msov vs Trainer+PEFT vs TRL packed, supervised
# tokens/s and peak GPU memory (bench/gpu_bench.py). Budget: under 8 minutes in all, each stage time-boxed.
# GPU_BENCH_ARGS passes options on (e.g. "--layers 16 --steps 6"); GPU_BENCH_DRY=1 runs the code path on the CPU
# with a tiny model (what can be checked without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[gpu.sh +$((SECONDS - START))s] $*" | tee -a "$OUT/gpu.log"; }

VENV="${GPU_BENCH_VENV:-${TMPDIR:-/tmp}/msov-gpu-venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "import mistral_sov, torch" 2>/dev/null; then
    log "creating $VENV (torch 2.13.0 from PyPI is the CUDA build; msov with its qlora extra)"
    python3 -m venv "$VENV" || exit 1
    timeout 240 "$VENV/bin/pip" install -q --upgrade pip >>"$OUT/gpu.log" 2>&1
    timeout 240 "$VENV/bin/pip" install -q torch==2.13.0 >>"$OUT/gpu.log" 2>&1 || { log "torch install failed"; exit 1; }
    timeout 180 "$VENV/bin/pip" install -q -c constraints.txt -e ".[qlora]" >>"$OUT/gpu.log" 2>&1 \
        || { log "msov install failed"; exit 1; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/gpu.log"

# TRL stays out of msov's environment: its own venv reading msov's packages (as bench/record_trl_dpo.py does).
TRL_VENV="${GPU_BENCH_TRL_VENV:-${TMPDIR:-/tmp}/msov-gpu-trl-venv}"
RUN_PY="$PY"
if [ ! -x "$TRL_VENV/bin/python" ] || ! "$TRL_VENV/bin/python" -c "import trl" 2>/dev/null; then
    python3 -m venv "$TRL_VENV" \
        && "$PY" -c "import site; print(site.getsitepackages()[0])" \
            > "$("$TRL_VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")/msov.pth" \
        && timeout 120 "$TRL_VENV/bin/pip" install -q --no-deps trl==1.16.0 >>"$OUT/gpu.log" 2>&1
fi
if "$TRL_VENV/bin/python" -c "import trl, mistral_sov" 2>/dev/null; then
    RUN_PY="$TRL_VENV/bin/python"
else
    log "TRL could not be installed: the trl_packed arms are skipped"
fi

if [ "${GPU_BENCH_DRY:-0}" = 1 ]; then
    set -- --device cpu --tiny --rows 64 --steps 2 --warmup 1 --arm-timeout 300
fi
log "bench: $RUN_PY bench/gpu_bench.py --out $OUT $* ${GPU_BENCH_ARGS:-}"
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
timeout 420 "$RUN_PY" bench/gpu_bench.py --out "$OUT" "$@" ${GPU_BENCH_ARGS:-} 2>>"$OUT/gpu.log" \
    | tee -a "$OUT/gpu.log"
status=${PIPESTATUS[0]}
log "bench finished with status $status"

# Another bench (long context) joins the same call when it is there (a GPU script: not in the CPU dry run).
if [ -f bench/gpu_long_context.sh ] && [ "${GPU_BENCH_DRY:-0}" != 1 ]; then
    log "running bench/gpu_long_context.sh"
    OUT="$OUT" bash bench/gpu_long_context.sh 2>&1 | tee -a "$OUT/gpu.log"
fi
log "done"
exit "$status"
