#!/usr/bin/env bash
# A fixed-schedule chain on generated demo data, run with the code of the current directory:
# demo data -> folds -> train two recipes (fixed epochs, seed, no workers) -> OOF and test predictions
# -> ensemble (weights and min-area post-processing tuned on OOF) -> submission.  Prints the sha256 of
# what a refactor must leave byte-identical: the ensemble's weights.yaml and postprocess.yaml and the
# submission CSV.  Usage: benchmarks/fixed_chain.sh OUT_DIR [PYTHON]   (run it from a checkout's root;
# compare two checkouts by running it in each with the same OUT_DIR name relative to each).
set -euo pipefail
out=${1:?usage: benchmarks/fixed_chain.sh OUT_DIR [PYTHON]}
py=${2:-.venv/bin/python}
epochs=${EPOCHS:-6}
rm -rf "$out" && mkdir -p "$out"
data=$out/data
$py -m pipeline.demo out_dir=$data n_train=36 n_test=8 height=64 width=96 seed=3 overwrite=true >/dev/null
$py -m pipeline.folds data_dir=$data out_dir=$out/folds k=3 seed=0 pixel_stats=false >/dev/null
for spec in "a unet" "b fpn"; do
  set -- $spec
  $py -m pipeline.train data_dir=$data folds_file=$out/folds/folds.csv fold=0 model=$2 encoder=resnet18 \
    encoder_weights=null epochs=$epochs 'img_size=[64,96]' batch_size=4 seed=0 runs_dir=$out/runs experiment=$1 \
    num_workers=0 progress=false device=cpu threads=1 weights_dir=$out/none >/dev/null 2>&1
  for split in val test; do
    $py -m pipeline.predict run_dir=$out/runs/$1/fold0 data_dir=$data tta=hflip split=$split progress=false \
      device=cpu >/dev/null 2>&1
  done
done
$py -m pipeline.ensemble runs="$out/runs/a $out/runs/b" data_dir=$data name=chain out_dir=$out/ensembles \
  postprocess=min_area n_trials=12 seed=0 progress=false >/dev/null 2>&1
$py -m pipeline.submit name=chain ensembles_dir=$out/ensembles data_dir=$data out_dir=$out/subs format=rle \
  progress=false >/dev/null 2>&1
sha256sum "$out/ensembles/chain/weights.yaml" "$out/ensembles/chain/postprocess.yaml" "$out/subs/chain.csv"
