#!/bin/bash
# The 40-epoch PTB sweep of PQ-aware training (--pq_aware_epochs: the dense layers train against their product
# quantization while their codes follow; hf_basis/pq_aware_training.py), behind recipes/results/ptb_pqa_*.json, for
# one GPU (run from the repo root; all runs side by side, ~20 min on an H100). The PQ-aware runs continue the dense
# run's epoch-10/20/30 checkpoint (--init_from, at the learning rate it had reached), which is what one process with
# --dense_warmup_epochs 38 --pq_aware_epochs 28 (18, 8) --continue_learning_rate true does; all switch at epoch 38. Logs and outputs in $RUNS (runs/).
#   PTB_DIR=path/to/ptb bash recipes/ptb_pq_aware_sweep.sh        (EPOCHS=2 EXTRA="--max_train_tokens 20000": smoke test)
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=${RUNS:-runs}; E=${EPOCHS:-40}; mkdir -p $R
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --report_to none ${EXTRA:-}"
PQA="--pq_weighting frequency --continue_learning_rate true"
OUT=recipes/configs/ptb_basis_output.yaml; BOTH=recipes/configs/ptb_basis_both.yaml
S=$((38 * E / 40))  # the switch to the basis layers: two epochs before the end
run() { local name=$1; shift
  ( python3 recipes/train_ptb.py "$@" $COMMON --num_train_epochs $E --output_dir $R/$name --cache_dir $R/cache_$name \
      > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
# branch NAME SOURCE EPOCH CONFIG [flags]: PQ-aware from the SOURCE run's epoch-EPOCH checkpoint to the switch
# (PLAIN=1 branch ...: the control, converted right away at EPOCH, without PQ-aware training).
branch() { local name=$1 src=$2 b=$3; shift 3
  local schedule="--dense_warmup_epochs $((S - b)) --pq_aware_epochs $((S - b))"
  [ "${PLAIN:-0}" = 1 ] && schedule="--dense_warmup_epochs 0"
  ( until first=$(ls -d $R/$src/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | head -1) && [ -n "$first" ] \
        && [ -f $R/$src/checkpoint-$first/trainer_state.json ]; do sleep 10; done
    c=$R/$src/checkpoint-$((b * first))
    until [ -f $c/trainer_state.json ]; do sleep 10; done; sleep 15
    lr=$(python3 -c "import torch; print(torch.load('$c/optimizer.pt', weights_only=False)['param_groups'][0]['lr'])")
    echo "branch from $c (epoch $b) at lr $lr" > $R/$name.log
    python3 recipes/train_ptb.py "$@" $COMMON --init_from $c --learning_rate $lr --num_train_epochs $((E - b)) \
        $schedule $PQA --output_dir $R/$name \
        --cache_dir $R/cache_$name >> $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
run dense recipes/configs/ptb_dense.yaml --save_strategy epoch
B10=$((10 * E / 40)); B20=$((20 * E / 40)); B30=$((30 * E / 40))
branch out_8x384_pqa10 dense $B10 $OUT
branch out_8x384_pqa20 dense $B20 $OUT
branch out_8x384_pqa30 dense $B30 $OUT
PLAIN=1 branch out_8x384_convert20 dense $B20 $OUT
branch both_8x400_pqa10 dense $B10 $BOTH
branch both_8x400_pqa20 dense $B20 $BOTH
wait
