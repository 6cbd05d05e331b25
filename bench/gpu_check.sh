#!/usr/bin/env bash
# One prepared GPU check of the local backend: CUDA tests + training and sampling benches, one table.
#
#   bash bench/gpu_check.sh                  # on one H100/H200 (about 6-8 minutes)
#   bash bench/gpu_check.sh --cpu-smoke      # here, without a GPU: the same steps at toy sizes
#   bash bench/gpu_check.sh --fetch-wheels DIR   # (with network) the pure-Python wheels to carry
#
# Needs only torch, transformers and peft on the GPU machine; loops' own pure-Python dependencies
# (pydantic, httpx, starlette, uvicorn, ...) are installed from $LOOPS_WHEELS (default
# bench/wheels, made by --fetch-wheels) when they are missing, without touching the network.
#
# Steps, each timed and logged under $OUT (default $TMPDIR/loops_gpu_check):
#   1. CUDA tests: trainer in fp32 and in bf16, HF sampler, placement (plan for the GPUs here);
#   2. training bench at the Qwen3-0.6B and Qwen3-1.7B shapes, 8 x 1024 tokens, against bare
#      HF + peft; the Qwen3-4B shape at 4 x 2048 (ours only: does it fit in 80 GB);
#   3. sampling bench with the HF engine at batch 1 and 64 against HF generate;
#   4. the table ($OUT/table.md): tokens/s, peak GPU memory, ratio to the baseline, and the goals.
# A failing step is recorded in the table and the script goes on (its exit code is then 1).
set -uo pipefail

MODE=gpu
case "${1:-}" in
  --cpu-smoke) MODE=cpu ;;
  --fetch-wheels)
    DIR=${2:?usage: --fetch-wheels DIR}
    mkdir -p "$DIR"
    cd "$(dirname "$0")/.."
    # The project's runtime dependencies (all pure Python; torch/transformers/peft are there already)
    # plus pytest, as wheels for the GPU machine's Python (PYVER, default 3.12).
    mapfile -t DEPS < <(python - <<'EOF2'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + ["pytest>=8", "pytest-timeout>=2.3"]))
EOF2
)
    python -m pip download -q -d "$DIR" --only-binary=:all: --python-version "${PYVER:-3.12}" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "${DEPS[@]}"
    echo "wheels in $DIR: carry them, then LOOPS_WHEELS=$DIR bash bench/gpu_check.sh"
    exit 0 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke | --fetch-wheels DIR]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/loops_gpu_check}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
export LOOPS_HOME=${LOOPS_HOME:-$OUT/loops_home}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
STATUS=0
T0=$(date +%s)

note() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

# A step: name, timeout in seconds, command. Output goes to $OUT/<name>.log; the outcome is recorded.
step() {
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  note "$name ..."
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  printf '{"bench": "step", "name": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$took" >> "$RESULTS"
  if [ "$rc" -ne 0 ]; then STATUS=1; note "$name FAILED (rc $rc, ${took}s): tail of $OUT/$name.log"; tail -n 15 "$OUT/$name.log"
  else note "$name ok (${took}s)"; fi
}

# ---- 0. environment: loops and its pure-Python dependencies, offline when wheels are carried ----
if ! $PY -c "import loops_core, loops_backends.local_gpu, pytest" 2>/dev/null; then
  WHEELS=${LOOPS_WHEELS:-bench/wheels}
  if [ -d "$WHEELS" ]; then
    # By requirement, not by file: what the GPU machine already satisfies (numpy) is left alone.
    mapfile -t DEPS < <($PY -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + ["pytest>=8", "pytest-timeout>=2.3"]))')
    $PY -m pip install -q --no-index --find-links "$WHEELS" "${DEPS[@]}" || STATUS=1
  fi
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
    # No build tooling there: the import names pyproject gives the folders, through a path shim.
    SHIM="$OUT/shim"; mkdir -p "$SHIM"
    ln -sfn "$PWD/backends" "$SHIM/loops_backends"; ln -sfn "$PWD/tinker_compat" "$SHIM/tinker"
    export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
$PY - <<'EOF' || { echo "torch / transformers / peft / loops do not import" >&2; exit 1; }
import torch, transformers, peft, loops_core
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
EOF

if [ "$MODE" = gpu ]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA GPU here: use --cpu-smoke" >&2; exit 1; }
  DEV=cuda; TRAIN_SHAPES="qwen3-0.6b qwen3-1.7b"; BATCH=8; SEQ=1024; STEPS=3; ROUNDS=2
  BIG="--shape qwen3-4b --batch 4 --seq 2048"; SAMPLE="--shape qwen3-0.6b --batches 1,64 --rounds 2"
  TEST_LIMIT=240
else
  DEV=cpu; TRAIN_SHAPES="tiny"; BATCH=2; SEQ=32; STEPS=1; ROUNDS=1
  BIG="--shape tiny --batch 2 --seq 64"; SAMPLE="--shape tiny --batches 1,4 --rounds 1 --new 4 --prompt 8"
  TEST_LIMIT=600
fi

# ---- 1. tests -------------------------------------------------------------------------------
PYTEST="$PY -m pytest -q -x -p no:cacheprovider"
if [ "$MODE" = gpu ]; then
  step test_trainer_fp32 $TEST_LIMIT env LOOPS_TRAINER_TEST_DEVICE=cuda LOOPS_TRAINER_TEST_DTYPE=float32 \
    $PYTEST tests/test_local_trainer.py
  step test_trainer_bf16 $TEST_LIMIT env LOOPS_TRAINER_TEST_DEVICE=cuda LOOPS_TRAINER_TEST_DTYPE=bfloat16 \
    $PYTEST tests/test_local_trainer.py
  step test_sampler_hf $TEST_LIMIT env LOOPS_SAMPLER_TEST_DEVICE=cuda $PYTEST tests/test_local_sampler.py
else  # the CPU-only parts: the numerics and placement checks that need no GPU
  step test_trainer_cpu $TEST_LIMIT env OMP_NUM_THREADS=1 $PYTEST tests/test_local_trainer.py \
    -k "bf16 or runs_interleaved or non_finite or top_k or offload"
fi
step test_placement 120 $PYTEST tests/test_placement.py
step placement_here 60 $PY - <<'EOF'
# The plan for the GPUs of this machine, for each benchmark shape (no GPU: says so).
import sys
sys.path.insert(0, "bench")
from _shapes import SHAPES
from loops_backends.local_gpu.placement import GiB, ModelShape, PlacementError, plan_placement, probe_gpus
gpus = probe_gpus()
print("GPUs:", [(g.index, round(g.total / GiB, 1), round(g.free / GiB, 1)) for g in gpus] or "none")
for name, cfg in SHAPES.items():
    try:
        p = plan_placement(ModelShape.from_config(cfg), gpus)
        print(f"{name}: trainer {p.trainer_device}, sampler {p.sampler_device}, trainer {p.trainer_resident / GiB:.1f} GiB"
              f" + headroom {p.activation_headroom / GiB:.1f} GiB, sampler share now "
              f"{p.sampler_memory_fraction(gpus[-1].free - p.trainer_resident * p.shared, gpus[-1].total):.2f}")
    except PlacementError as e:
        print(f"{name}: {e}")
EOF

# ---- 2. training bench ----------------------------------------------------------------------
for shape in $TRAIN_SHAPES; do
  step "train_$shape" 300 $PY bench/train_throughput.py --shape "$shape" --batch $BATCH --seq $SEQ \
    --steps $STEPS --rounds $ROUNDS --warmup 1 --json "$RESULTS"
done
step train_big_fits 300 $PY bench/train_throughput.py $BIG --no-bare --steps 1 --rounds 1 --warmup 1 --json "$RESULTS"

# ---- 3. sampling bench (HF engine) ----------------------------------------------------------
step sample_hf 300 $PY bench/sample_throughput.py $SAMPLE --sampler-engine hf --json "$RESULTS"

# ---- 4. the table ---------------------------------------------------------------------------
$PY - "$RESULTS" "$MODE" > "$OUT/table.md" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
mode = sys.argv[2]
mib = lambda b: "n/a" if not b else f"{b / 2**20:,.0f} MiB"
ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "n/a"
GOAL_TPS = {"qwen3-0.6b": 3.0, "qwen3-1.7b": 2.5}
out = [f"# bench/gpu_check.sh ({mode})", "",
       "| bench | shape | batch | bare tok/s | loops tok/s | ratio | bare peak | loops peak | mem ratio | goal |",
       "|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    if r["bench"] == "train":
        goal = []
        if r["shape"] in GOAL_TPS and r["bare_tps"]:
            goal.append(("ok" if r["loops_tps"] / r["bare_tps"] >= GOAL_TPS[r["shape"]] else "MISS")
                        + f" (>= {GOAL_TPS[r['shape']]}x)")
        if r["bare_peak_bytes"] and r["shape"] in GOAL_TPS:
            goal.append(("ok" if r["loops_peak_bytes"] <= 0.4 * r["bare_peak_bytes"] else "MISS") + " (mem <= 40%)")
        if not r["bare_tps"]:
            goal.append(("ok" if r["loops_peak_bytes"] < 80e9 else "MISS") + " (fits 80 GB)")
        out.append(f"| train | {r['shape']} | {r['batch']}x{r['seq']} | {r['bare_tps'] or 0:,.0f} | {r['loops_tps']:,.0f} "
                   f"| {ratio(r['loops_tps'], r['bare_tps'])} | {mib(r['bare_peak_bytes'])} | {mib(r['loops_peak_bytes'])} "
                   f"| {ratio(r['loops_peak_bytes'], r['bare_peak_bytes'])} | {'; '.join(goal)} |")
    elif r["bench"] == "sample":
        want = 10.0 if r["batch"] == 1 else 5.0
        goal = ("ok" if r["loops_tps"] / r["bare_tps"] >= want else "MISS") + f" (>= {want:g}x)"
        out.append(f"| sample ({r['engine']}) | {r['shape']} | {r['batch']} | {r['bare_tps']:,.1f} | {r['loops_tps']:,.1f} "
                   f"| {ratio(r['loops_tps'], r['bare_tps'])} | | | | {goal} |")
out += ["", "| step | rc | seconds |", "|---|---|---|"]
out += [f"| {r['name']} | {r['rc']} | {r['seconds']} |" for r in rows if r["bench"] == "step"]
if mode == "cpu":
    out += ["", "CPU smoke run: toy sizes on the tiny model; the figures say nothing about the GPU goals."]
print("\n".join(out))
EOF
cat "$OUT/table.md"
note "done in $(( $(date +%s) - T0 ))s; table: $OUT/table.md"
exit $STATUS
