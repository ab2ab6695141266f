#!/bin/bash
# The 40-epoch PTB sweep of PQ-aware training (--pq_aware_epochs: the dense layers train against their product
# quantization, codes follow; see hf_basis/pq_aware_training.py), behind recipes/results/ptb_pqa*_40ep.json, for one
# GPU (run from the repo root; all runs side by side, ~25 min on an H100). Logs and outputs in runs/.
#   PTB_DIR=path/to/ptb bash recipes/ptb_pq_aware_sweep.sh        (EPOCHS=2 for a smoke test)
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=${RUNS:-runs}; E=${EPOCHS:-40}; mkdir -p $R
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --report_to none --num_train_epochs $E ${EXTRA:-}"
PQA="--pq_weighting frequency --continue_learning_rate true"
ADAM="--basis_optimizer adam --basis_learning_rate 1e-2"
MED="--emsize 650 --nhid 650 --dropout 0.5"
# pqa NAME CONFIG START SWITCH [flags]: dense until epoch START, PQ-aware until SWITCH (of 40), basis after.
pqa() { local name=$1 config=$2 start=$3 switch=$4; shift 4
  local s=$((switch * E / 40)) p=$(((switch - start) * E / 40))
  run $name $config --dense_warmup_epochs $s --pq_aware_epochs $p $PQA "$@"; }
run() { local name=$1; shift
  ( python3 recipes/train_ptb.py "$@" $COMMON --output_dir $R/$name --cache_dir $R/cache_$name > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
OUT=recipes/configs/ptb_basis_output.yaml; BOTH=recipes/configs/ptb_basis_both.yaml
run dense recipes/configs/ptb_dense.yaml
pqa out_8x384_pqa0_sw38 $OUT 0 38
pqa out_8x384_pqa10_sw38 $OUT 10 38
pqa out_8x384_pqa20_sw38 $OUT 20 38
pqa out_8x384_pqa20_sw38_r100 $OUT 20 38 --pq_refresh_steps 100
pqa out_8x384_pqa10_sw38_r1000 $OUT 10 38 --pq_refresh_steps 1000
pqa out_8x384_pqa10_sw34 $OUT 10 34
pqa out_8x384_pqa10_sw38_adam $OUT 10 38 $ADAM
pqa both_8x400_pqa0_sw38 $BOTH 0 38
pqa both_8x400_pqa10_sw38 $BOTH 10 38
pqa both_8x400_pqa20_sw38 $BOTH 20 38
run quant8_both_sw36 recipes/configs/ptb_quant.yaml --nbit 8 --dense_warmup_epochs $((36 * E / 40)) --continue_learning_rate true
run medium_dense recipes/configs/ptb_dense.yaml $MED
pqa medium_both_10x400_pqa10_sw38 $BOTH 10 38 --num_basis 10 $MED
wait
