#!/usr/bin/env bash
# Benchmarks on a bare GPU machine (Python 3.12 with torch), run from the repo root:  bash benchmarks/gpu_run.sh
# Needs the ignored folder .whl/ carried along (benchmarks/gpu_wheels.sh makes it). Step a needs the anchor
# scripts of ../shared/bench copied into the ignored folder .bench/ (and carried); it is skipped without them.
#
# Env knobs:
#   STEPS         which steps, default "e b c d a"
#                   a  anchor prototype     .bench/extract_proto.py        -> $OUT/a_extract_proto.log (+ extract_proto.json)
#                   b  extract benchmark    benchmarks/extract.py           -> $OUT/b_extract.log
#                   c  train from store     benchmarks/train_from_store.py  -> $OUT/c_train_from_store.log
#                   d  CUDA tests           tests/test_{extract,model,data,augment,train}.py  -> $OUT/d_pytest_extract.log
#                   e  nvjpeg vs PIL        benchmarks/decode_agreement.py  -> $OUT/e_decode_agreement.log
#                   f  step c with TRAIN.COMPILE=true (not in the default STEPS: compiling takes minutes)
#                                                                                  -> $OUT/f_train_compiled.log
#                   g  step c with the augmentation in the loader processes (AUG.WHERE=loader; c puts it on the GPU)
#                                                                                  -> $OUT/g_train_aug_in_loader.log
#                   p  predict at 4K    benchmarks/predict.py           -> $OUT/p_predict.log (not in the default STEPS)
#   EXTRACT_ARGS  arguments of step b, default "--skip-cpu --gpu-images 8192 --gpu-shards 4 --gpu-workers 0,2"
#   TRAIN_ARGS    arguments of step c, default "--device cuda --images 512 --batch-size 64 --steps 5 --num-workers 12"
#   PYTEST_K      -k expression of step d, default "gpu_decode or device_crops or mixed or cuda_training_step or pinned
#                 or on_cuda"
#   T_A ... T_G, T_P  per-step timeouts in s (150 240 150 90 60 240 150, 120)
#   BUDGET_S      wall-clock budget of the whole script (default 570): a step's timeout is cut to what is left,
#                 and a step is skipped when under 20 s are left, so the summary always gets printed
#   OUT           output folder (default /tmp/out)
#   PY            python to use (default python3); NO_INSTALL=1 skips the wheel install (local dry runs)
set -u
export PYTHONUNBUFFERED=1
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OUT
PY=${PY:-python3}
STEPS=${STEPS:-"e b c d a"}
EXTRACT_ARGS=${EXTRACT_ARGS:-"--skip-cpu --gpu-images 8192 --gpu-shards 4 --gpu-workers 0,2"}
TRAIN_ARGS=${TRAIN_ARGS:-"--device cuda --images 512 --batch-size 64 --steps 5 --num-workers 12"}
PYTEST_K=${PYTEST_K:-"gpu_decode or device_crops or mixed or cuda_training_step or pinned or on_cuda"}
ROOT=$(pwd)
[ -d .whl ] && [ -d benchmarks ] || { echo "run from the repo root, with .whl/ carried along" >&2; exit 1; }

if [ "${NO_INSTALL:-0}" != 1 ]; then
    T=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$T" .whl/*.whl || exit 1
    export PYTHONPATH="$T"
    # the semspai wheel must be this tree's code: a wheel built before the last change would measure old code
    "$PY" - "$T" <<'PYEOF' || exit 1
import filecmp, pathlib, sys
installed = pathlib.Path(sys.argv[1]) / "semspai"
folders = {"": "semspai", "store": "store", "pipeline": "pipeline", "stages": "stages", "configs": "configs"}
stale = []
for sub, src in folders.items():
    for f in pathlib.Path(src).rglob("*" if sub == "configs" else "*.py"):
        if not f.is_file() or "__pycache__" in f.parts:
            continue
        have = installed / sub / f.relative_to(src)
        if not have.exists() or not filecmp.cmp(f, have, shallow=False):
            stale.append(str(f))
if stale:
    sys.exit(f"the semspai wheel in .whl/ is older than this tree ({len(stale)} file(s) differ, e.g. {stale[0]}): "
             "run `bash benchmarks/gpu_wheels.sh` again")
print("semspai wheel matches the tree")
PYEOF
fi
echo "== setup $((SECONDS - START)) s"

# `python -c` and `python -m` put the cwd first on sys.path, where the source folder semspai/ (without
# pipeline/, store/, stages/) would shadow the installed package: -P leaves the cwd out. Scripts run as
# `python file.py` get their own folder instead, which is fine.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.log"
"$PY" -P - <<'PYEOF' 2>&1 | tee -a "$OUT/env.log"
import os, sys, importlib.metadata as md
WHEELS = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
import torch, torchvision
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| cuda", torch.version.cuda, "available", torch.cuda.is_available())
vs = []
for n in ("numpy", "timm", "huggingface_hub", "safetensors", "pillow", "pytest", "open_clip_torch", "zarr", "dask"):
    try:
        vs.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vs.append(f"{n} MISSING")
print(" | ".join(vs))
# every Requires-Dist (no extras) of the installed wheels, checked against what this python sees
try:
    from packaging.requirements import Requirement
    bad = []
    for dist in md.distributions():
        if not WHEELS or not str(getattr(dist, "_path", "")).startswith(WHEELS):
            continue  # only the dists installed from .whl/
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                bad.append(f"{dist.metadata['Name']}: {r} -> MISSING")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                bad.append(f"{dist.metadata['Name']}: {r} -> have {have}")
    print("requirements of the wheels:", "all met" if not bad else "UNMET " + "; ".join(bad))
except Exception as e:  # the check is advisory
    print("requirements check skipped:", e)
PYEOF
"$PY" -P -c "import semspai, open_clip, zarr, dask, distributed, webdataset; import semspai.pipeline.extraction; print('imports ok')" 2>&1 | tee -a "$OUT/env.log"

declare -A RC LOG
ORDER=()
step() {  # step NAME DEFAULT_TIMEOUT DIR CMD...
    local name=$1 to=$2 dir=$3; shift 3
    local left=$((BUDGET_S - (SECONDS - START) - 5))
    local log="$OUT/$name.log"
    ORDER+=("$name"); LOG[$name]=$log
    if [ "$left" -lt 20 ]; then
        echo "== $name SKIPPED: ${left}s left of BUDGET_S=$BUDGET_S" | tee "$log"; RC[$name]=skipped; return
    fi
    [ "$to" -gt "$left" ] && to=$left
    echo "== $name (timeout ${to}s, at $((SECONDS - START))s): $*" | tee "$log"
    local t0=$SECONDS
    (cd "$dir" && timeout -k 5 "$to" "$@") 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc (TIMEOUT)"
    RC[$name]="$rc, $((SECONDS - t0))s"
    echo "== $name rc=${RC[$name]}" | tee -a "$log"
}

for s in $STEPS; do
    case $s in
        a) if [ -f .bench/extract_proto.py ]; then step a_extract_proto "${T_A:-150}" "$ROOT/.bench" "$PY" extract_proto.py
           else echo "== a skipped: no .bench/extract_proto.py"; fi ;;
        # shellcheck disable=SC2086  # EXTRACT_ARGS / TRAIN_ARGS are meant to split into words
        b) step b_extract "${T_B:-240}" "$ROOT" "$PY" benchmarks/extract.py $EXTRACT_ARGS ;;
        c) step c_train_from_store "${T_C:-150}" "$ROOT" "$PY" benchmarks/train_from_store.py $TRAIN_ARGS ;;
        # tests/store_data.py imports `tests.conftest`: the repo root goes on the path, but after the wheels
        d) step d_pytest_extract "${T_D:-90}" "$ROOT" env PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT" \
               "$PY" -P -m pytest -q -p no:cacheprovider tests/test_extract.py tests/test_model.py tests/test_data.py \
               tests/test_augment.py tests/test_train.py -k "$PYTEST_K" ;;
        e) step e_decode_agreement "${T_E:-60}" "$ROOT" "$PY" benchmarks/decode_agreement.py ;;
        # shellcheck disable=SC2086
        f) step f_train_compiled "${T_F:-240}" "$ROOT" "$PY" benchmarks/train_from_store.py $TRAIN_ARGS \
               --set TRAIN.COMPILE=true ;;
        # shellcheck disable=SC2086
        g) step g_train_aug_in_loader "${T_G:-150}" "$ROOT" "$PY" benchmarks/train_from_store.py $TRAIN_ARGS \
               --set AUG.WHERE=loader ;;
        p) step p_predict "${T_P:-120}" "$ROOT" "$PY" benchmarks/predict.py --device cuda --sizes 3840x2160 \
               --small-images 256 ;;
        *) echo "unknown step '$s' (a b c d e f g p)" ;;
    esac
done

echo
echo "================ summary ($((SECONDS - START))s in all; logs in $OUT)"
head -n 2 "$OUT/env.log"
for name in "${ORDER[@]}"; do
    echo "---- $name: rc=${RC[$name]}"
    grep -v "^== " "${LOG[$name]}" | tail -n 14
done
