#!/usr/bin/env bash
# One prepared run of every CUDA path and benchmark of linft, for a lent GPU machine (a few minutes on an H200).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (torch, torchvision, h5py, click, matplotlib, scipy there)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # a dry run of the script itself on a CPU machine
#
# Installs linft without dependencies (never with the pins), then runs, each in its own step with its wall time:
# the CUDA paths end to end on the built-in benchmark (extract with bfloat16 autocast (the default --precision) and
# channels_last, and with float16, linear fine-tuning on the GPU, full fine-tuning with bfloat16 autocast and
# --ensembles, a linearized run, interpolation with the jvp path and in float32, report), the same stages on
# transformers (torchvision ViT-B/16 and, when open_clip is installed, CLIP ViT-B/32, random weights: nothing
# downloads), then the benchmarks with --device cuda (ViT-B/16 too; and the linear engine's step captured as a CUDA graph
# against the eager step: time per step, largest difference). Output and JSON figures
# go to ${OUT:-/tmp/linft_gpu_check}.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT_DIR=${OUT:-/tmp/linft_gpu_check}
QUICK=${QUICK:-0}
mkdir -p "$OUT_DIR"
W=$(mktemp -d)
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, time, keep going on failure
    local name=$1; shift
    local t0=$EPOCHREALTIME
    echo "=== $name"
    if "$@" > "$OUT_DIR/$name.log" 2>&1; then r=ok; else r="FAILED ($?)"; status=1; fi
    echo "=== $name: $r in $(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}") s"
    tail -n 25 "$OUT_DIR/$name.log"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

# QUICK (a CPU dry run): ViT-B/32 (49 tokens) and tiny batches, else ViT-B/16 at the paper's batch; the linearized ViT
# run takes 8 images per domain in both (forward, jvp and backward through both: a CPU with 24 GiB ran out at 32)
if [ "$QUICK" = 1 ]; then LSTEPS=20; FSTEPS=6; EVERY=3; PER=12; VSTEPS=2; VNAME=vit_b_32; VBATCH=2; VLBATCH=2
else LSTEPS=2000; FSTEPS=300; EVERY=100; PER=150; VSTEPS=100; VNAME=vit_b_16; VBATCH=32; VLBATCH=8; fi
step demo_data linft demo-data "$W/data" --per-class "$PER"
step extract linft extract "$W/data" --backbone demo-resnet --image-size 64 --device "$DEVICE" --out "$W/c.h5" --quiet
step extract_fp16 linft extract "$W/data" --backbone demo-resnet --image-size 64 --device "$DEVICE" --precision float16 --out "$W/c16.h5" --quiet
step extract_views linft extract "$W/data" --backbone demo-resnet --image-size 64 --device "$DEVICE" --views 2 --out "$W/cv.h5" --quiet
step verify linft cache verify "$W/c.h5" --data "$W/data"
step train_linear linft train-linear "$W/c.h5" --dropout 0 --dropout 0.9 --probe --steps "$LSTEPS" --device "$DEVICE" --out "$W/lin" --quiet
step train_linear_views linft train-linear "$W/cv.h5" --dropout 0.9 --seeds 1 --steps "$LSTEPS" --device "$DEVICE" --out "$W/linv" --quiet
step finetune linft finetune "$W/data" --backbone demo-resnet --image-size 64 --dropout 0 --dropout 0.9 --lr 1e-3 \
    --weight-decay 1e-4 --seeds 1 --steps "$FSTEPS" --eval-every "$EVERY" --ensembles --device "$DEVICE" --out "$W/ft" --quiet
step finetune_linearized linft finetune "$W/data" --backbone demo-resnet --image-size 64 --linearized --lr 1e-3 \
    --weight-decay 1e-4 --seeds 1 --test-domains sketch --steps "$FSTEPS" --eval-every "$EVERY" --device "$DEVICE" --out "$W/ftlin" --quiet
RUN=$(dirname "$(ls "$W"/ft/*/selected.pt | head -1)")
step interpolate linft interpolate "$W/data" --finetuned "$RUN" --linearity --device "$DEVICE" --out "$W/interp" --quiet
step interpolate_fp32 linft interpolate "$W/data" --finetuned "$RUN" --precision float32 --no-blocks --device "$DEVICE" --out "$W/interp_fp32" --quiet
step report linft report "$W/lin" "$W/ft" "$W/interp" --out "$W/report" --json

# transformers: every stage on torchvision's ViT-B/16 (ViT-B/32 in QUICK), extraction on CLIP ViT-B/32 when open_clip is there
VIT=(--backbone "$VNAME" --weights none --image-size 224 --device "$DEVICE")
step extract_vit linft extract "$W/data" "${VIT[@]}" --out "$W/cvit.h5" --quiet
step train_linear_vit linft train-linear "$W/cvit.h5" --dropout 0.9 --seeds 1 --steps "$LSTEPS" --device "$DEVICE" --out "$W/linvit" --quiet
step finetune_vit linft finetune "$W/data" "${VIT[@]}" --batch-size "$VBATCH" --dropout 0.9 --stochastic-depth 0.1 --lr 1e-3 --weight-decay 1e-4 \
    --seeds 1 --test-domains sketch --steps "$VSTEPS" --eval-every "$VSTEPS" --out "$W/ftvit" --quiet
step finetune_vit_linearized linft finetune "$W/data" "${VIT[@]}" --batch-size "$VLBATCH" --linearized --lr 1e-3 --weight-decay 1e-4 \
    --seeds 1 --test-domains sketch --steps "$VSTEPS" --eval-every "$VSTEPS" --out "$W/ftvitlin" --quiet
VRUN=$(dirname "$(ls "$W"/ftvit/*/selected.pt | head -1)")
step interpolate_vit linft interpolate "$W/data" --finetuned "$VRUN" --linearity --no-blocks --device "$DEVICE" --out "$W/interpvit" --quiet
if python3 -c "import open_clip" 2> /dev/null; then
    step extract_clip linft extract "$W/data" --backbone clip:ViT-B-32 --weights none --device "$DEVICE" --out "$W/cclip.h5" --quiet
else
    echo "=== extract_clip: skipped (open_clip not installed: pip install open_clip_torch)"
fi

if [ "$QUICK" = 1 ]; then
    step bench_linear python3 benchmarks/linear_grid.py --device "$DEVICE" --steps 5 --repeats 1 --grids 0.9 --json
    step linear_graph python3 benchmarks/linear_grid.py --device "$DEVICE" --graph-check 12
    step linear_protocol python3 benchmarks/linear_grid.py --device "$DEVICE" --protocol 30 --profile
    step linear_tensor_cores python3 benchmarks/linear_grid.py --device "$DEVICE" --tensor-core-check
    step bench_finetune python3 benchmarks/finetune_step.py --device "$DEVICE" --steps 1 --rounds 1 --json
    step bench_interpolate python3 benchmarks/interpolate_cost.py --device "$DEVICE" --images 16 --steps 1 --json
    step bench_extract python3 benchmarks/extract_throughput.py --device "$DEVICE" --images 48 --batch-size 8 --backbone resnet18 --image-size 64 --json
    step bench_extract_vit python3 benchmarks/extract_throughput.py --device "$DEVICE" --images 48 --batch-size 8 --backbone vit_b_16 --json
    step bench_finetune_vit python3 benchmarks/finetune_step.py --device "$DEVICE" --backbone vit_b_16 --batch-size 4 --steps 1 --rounds 1 --json
else
    step bench_linear python3 benchmarks/linear_grid.py --device "$DEVICE" --json
    step linear_graph python3 benchmarks/linear_grid.py --device "$DEVICE" --graph-check 300
    step linear_protocol python3 benchmarks/linear_grid.py --device "$DEVICE" --protocol 10000 --profile
    step linear_tensor_cores python3 benchmarks/linear_grid.py --device "$DEVICE" --tensor-core-check
    step bench_finetune python3 benchmarks/finetune_step.py --device "$DEVICE" --json
    step bench_interpolate python3 benchmarks/interpolate_cost.py --device "$DEVICE" --backbone resnet50 --image-size 224 --json
    step bench_extract python3 benchmarks/extract_throughput.py --device "$DEVICE" --images 2048 --batch-size 256 --json
    step bench_extract_vit python3 benchmarks/extract_throughput.py --device "$DEVICE" --images 2048 --batch-size 256 --backbone vit_b_16 --json
    step bench_finetune_vit python3 benchmarks/finetune_step.py --device "$DEVICE" --backbone vit_b_16 --json
fi
rm -rf "$W"
echo "gpu_check: $([ $status = 0 ] && echo all steps ok || echo SOME STEPS FAILED); logs in $OUT_DIR"
exit $status
