#!/usr/bin/env bash
# Stage 1 of the two-stage recipe on a one-GPU machine: the whole EfficientNet-Lite0 trunk
# fine-tuned on X-rays under a pooling + dense head, in every fold of a cross-validation and once
# on all images, each part a `capsedge train --fold` process sharing the GPU.
#
#   train/gpu_stage1.sh DATA OUT [EPOCHS] [MODEL] [FOLDS]
#
# Writes OUT/stage1/, a cross-validation run folder: stage 2 starts from it with
# `capsedge train --init run:OUT/stage1 ...` (fold K from fold-K/trunk.npz, the final run from
# final/trunk.npz). For machines whose files travel back in few, small files, OUT/pack/ holds one
# tar per part (its run folder without classifier.keras: trunk.npz in float16 with the linear head
# that --stage1-readout keeps, metrics, held-out
# answers; about 6.5 MB at 512 px) and stage1-summary.tar.gz (summary, settings, logs,
# provenance.json: the command, commit, machine and versions). Unpack them all into one folder:
#   for t in pack/*.tar.gz; do tar xzf "$t" -C runs/stage1; done
#
# Defaults: 50 epochs of lite0_linear_512, 5 folds, --augment full, AdamW (wd 0.05), warm-up
# and cosine decay from 1e-3, batch 32. Environment: KERAS_BACKEND (default jax: a GPU machine
# with JAX and no TensorFlow), CAPSEDGE (the command, default capsedge), PARALLEL (parts trained
# at once, default 3: on one H200, six at once ran three out of GPU memory, three at once took
# 270 s for 50 epochs), WORKERS (augmenting threads per part, default 4), CAPSEDGE_COMMIT
# (recorded in the provenance), PYTHON (the Python with Keras that writes the provenance, default
# python3), STAGE1_OPTIONS (more `capsedge train` options for a variant of the
# recipe, e.g. "--schedule one-cycle --warmup 0.3 --label-smoothing 0"; recorded in cv_settings.json and the provenance).
# PARTS (the parts to train, default every fold and final, e.g. "2 3 final" to finish a
# cross-validation begun elsewhere in OUT/stage1): the summary is written once every part is done.
# Re-running it resumes: finished parts are skipped, interrupted ones resume from their last epoch
# (or start again, where a part stopped while writing its first epoch's backup).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 DATA OUT [EPOCHS] [MODEL] [FOLDS]" >&2
    exit 2
fi
data=$1
out=$2
epochs=${3:-50}
model=${4:-lite0_linear_512}
folds=${5:-5}
capsedge=${CAPSEDGE:-capsedge}
python=${PYTHON:-python3}
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
# Several processes share one GPU: each takes the memory it needs, not 75 % of it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

run=$out/stage1
pack=$out/pack
mkdir -p "$run" "$pack" "$out/logs"
recipe=(--data "$data" --out "$run" --model "$model" --freeze-stages 0 --augment full
        --epochs "$epochs" --folds "$folds" --final)
read -ra variant <<< "${STAGE1_OPTIONS:-}"
recipe+=(${variant[@]+"${variant[@]}"})

# The run folder of a part: fold-K, or final.
part_dir() { if [ "$1" = final ]; then echo final; else echo "fold-$1"; fi; }

started=$(date +%s)
all_parts="$(seq -s ' ' 0 $((folds - 1))) final"
for part in ${PARTS:-$all_parts}; do
    while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-3}" ]; do wait -n || true; done
    name=$(part_dir "$part")
    (
        "$capsedge" train "${recipe[@]}" --fold "$part" --workers "${WORKERS:-4}" \
            >"$out/logs/$name.log" 2>&1 \
            && tar czf "$pack/stage1-$name.tar.gz" -C "$run" --exclude classifier.keras \
                --exclude backup "$name" \
            && echo "$name done after $(($(date +%s) - started)) s" \
            || { echo "$name FAILED after $(($(date +%s) - started)) s:"; tail -5 "$out/logs/$name.log"; }
    ) &
done
wait
unfinished=()
for part in $all_parts; do
    name=$(part_dir "$part")
    # Complete as RunDir.complete says: metrics written, no backup left.
    [ -f "$run/$name/metrics.json" ] && [ ! -d "$run/$name/backup" ] || unfinished+=("$name")
done
if [ ${#unfinished[@]} -eq 0 ]; then
    "$capsedge" train "${recipe[@]}" --resume >"$out/logs/summary.log" 2>&1 \
        || { echo "summary FAILED:"; tail -5 "$out/logs/summary.log"; exit 1; }
    tail -3 "$out/logs/summary.log"
else
    echo "no summary yet: ${unfinished[*]} not done"
fi

"$python" - "$run/provenance.json" "${STAGE1_OPTIONS:+STAGE1_OPTIONS=\"$STAGE1_OPTIONS\" }$0 $*" "$(($(date +%s) - started))" <<'EOF'
import json, os, platform, subprocess, sys
import keras
def gpu() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"
backend = keras.backend.backend()
versions = {"python": platform.python_version(), "keras": keras.__version__, "backend": backend}
# The backend's own version (jax, torch or tensorflow), and JAX's matmul precision when set.
versions[backend] = __import__(backend).__version__
if os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"):
    versions["jax_default_matmul_precision"] = os.environ["JAX_DEFAULT_MATMUL_PRECISION"]
with open(sys.argv[1], "w") as handle:
    json.dump({"command": sys.argv[2], "commit": os.environ.get("CAPSEDGE_COMMIT", "unknown"),
               "machine": {"gpu": gpu(), "cpus": os.cpu_count(), "platform": platform.platform()},
               "versions": versions, "seconds": int(sys.argv[3])}, handle, indent=2)
EOF
summary=()
for name in cv_summary.json cv_settings.json provenance.json confusion.png per_class.png reliability.png; do
    [ -f "$run/$name" ] && summary+=("$name")
done
tar czf "$pack/stage1-summary.tar.gz" -C "$run" "${summary[@]}" -C "$out" logs
if [ ${#unfinished[@]} -gt 0 ]; then
    echo "stage 1 not finished after $(($(date +%s) - started)) s (${unfinished[*]}): run again to resume"
    exit 1
fi
echo "stage 1 done in $(($(date +%s) - started)) s: $run, packed in $pack"
