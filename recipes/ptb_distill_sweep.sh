#!/bin/bash
# Issue 17's distillation runs, for one GPU (run from the repo root; ~25 min on an H100: two rounds of ~12 min).
#   1. the dense teacher (recipes/configs/ptb_dense.yaml, 40 epochs), beside two plain-conversion runs that need no
#      teacher: 8 x 384 output converted at epoch 5, 8 x 400 input + output converted at 10;
#   2. once the teacher is saved, side by side: the 8 x 384 output layer converted at 10 and distilled for the other
#      30 epochs (alpha 0.5 / tau 1 and alpha 0.9 / tau 2), and the equally tuned reference, a dense student distilled
#      the same way after epoch 10 (both settings).
# Logs and outputs in $RUNS (runs/); each run's results.json in $RUNS/NAME/.
#   PTB_DIR=path/to/ptb bash recipes/ptb_distill_sweep.sh     (EPOCHS=4 EXTRA="--max_train_tokens 8000": smoke test)
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=${RUNS:-runs}; E=${EPOCHS:-40}; mkdir -p $R
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --report_to none --num_train_epochs $E ${EXTRA:-}"
OUT=recipes/configs/ptb_basis_output.yaml; BOTH=recipes/configs/ptb_basis_both.yaml; DENSE=recipes/configs/ptb_dense.yaml
AT() { echo $(($1 * E / 40)); }  # epoch N of 40, scaled to EPOCHS
run() { local name=$1; shift
  ( python3 recipes/train_ptb.py "$@" $COMMON --output_dir $R/$name --cache_dir $R/cache_$name > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
run teacher $DENSE
run out_8x384_plain5 $OUT --dense_warmup_epochs $(AT 5)
run both_8x400_plain10 $BOTH --dense_warmup_epochs $(AT 10) --pq_aware_epochs 0
wait
KD="--dense_warmup_epochs $(AT 10) --continue_learning_rate true --distill_from $R/teacher"
run out_8x384_kd10_a0.5_t1 $OUT $KD --distill_alpha 0.5 --distill_temperature 1
run out_8x384_kd10_a0.9_t2 $OUT $KD --distill_alpha 0.9 --distill_temperature 2
run dense_kd10_a0.5_t1 $DENSE $KD --distill_alpha 0.5 --distill_temperature 1
run dense_kd10_a0.9_t2 $DENSE $KD --distill_alpha 0.9 --distill_temperature 2
wait
grep -H "test perplexity" $R/*.log
