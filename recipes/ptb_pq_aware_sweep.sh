#!/bin/bash
# The 40-epoch PTB runs of PQ-aware training (--pq_aware_epochs: a phase in which the layers compute with their
# product quantization, the centroids train and each word's codes follow its dense row; hf_basis/pq_aware_training.py)
# behind recipes/results/ptb_pqa_*.json, for one GPU (run from the repo root; four runs side by side, ~15 min on an
# H200). Each run is dense until START, PQ-aware until epoch 38, then basis layers for the last two epochs, with the
# learning rate carried across the phases. Logs and outputs in $RUNS (runs/).
#   PTB_DIR=path/to/ptb bash recipes/ptb_pq_aware_sweep.sh        (EPOCHS=4 EXTRA="--max_train_tokens 8000": smoke test)
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=${RUNS:-runs}; E=${EPOCHS:-40}; mkdir -p $R
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --report_to none --num_train_epochs $E ${EXTRA:-}"
PQA="--pq_weighting frequency --continue_learning_rate true"
OUT=recipes/configs/ptb_basis_output.yaml; BOTH=recipes/configs/ptb_basis_both.yaml
S=$((38 * E / 40))  # the switch to the basis layers: two epochs before the end
run() { local name=$1; shift
  ( python3 recipes/train_ptb.py "$@" $COMMON --output_dir $R/$name --cache_dir $R/cache_$name > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
# pqa NAME CONFIG START [flags]: dense until epoch START (of 40), PQ-aware until the switch, basis after it.
pqa() { local name=$1 config=$2 start=$(($3 * E / 40)); shift 3
  run $name $config --dense_warmup_epochs $S --pq_aware_epochs $((S - start)) $PQA "$@"; }
run dense recipes/configs/ptb_dense.yaml
pqa out_8x384_pqa10 $OUT 10
pqa out_8x384_pqa20 $OUT 20
pqa both_8x400_pqa10 $BOTH 10
wait
