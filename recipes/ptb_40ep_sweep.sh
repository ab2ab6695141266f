#!/bin/bash
# The 40-epoch PTB sweep behind recipes/results/ptb_*40ep*.json and ptb_branch*.json, for one GPU (run from the repo
# root; ~20 min on an H200, all runs side by side): full runs, and branches that continue the dense run's epoch
# checkpoints with --init_from at the learning rate it had reached. Logs and outputs in runs/.
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=runs; mkdir -p $R
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --report_to none"
BASIS="--pq_weighting frequency --pq_calibration_batches 200 --basis_optimizer adam --basis_learning_rate 1e-2"
MED="--emsize 650 --nhid 650 --dropout 0.5"
run() { local name=$1; shift
  ( python3 recipes/train_ptb.py "$@" $COMMON --output_dir $R/$name --cache_dir $R/cache_$name > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
branch() { local name=$1 src=$2 E=$3; shift 3
  ( until first=$(ls -d $R/$src/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | head -1) && [ -n "$first" ] \
        && [ -f $R/$src/checkpoint-$first/trainer_state.json ]; do sleep 10; done
    c=$R/$src/checkpoint-$((E*first))
    until [ -f $c/trainer_state.json ]; do sleep 10; done; sleep 15
    lr=$(python3 -c "import torch; print(torch.load('$c/optimizer.pt', weights_only=False)['param_groups'][0]['lr'])")
    echo "branch from $c (epoch $E) at lr $lr" > $R/$name.log
    python3 recipes/train_ptb.py "$@" $COMMON --init_from $c --learning_rate $lr --num_train_epochs $((40-E)) \
        --dense_warmup_epochs 0 --output_dir $R/$name --cache_dir $R/cache_$name >> $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
run dense recipes/configs/ptb_dense.yaml --save_strategy epoch
run full_out_8x384_sw36 recipes/configs/ptb_basis_output.yaml --dense_warmup_epochs 36 $BASIS
run full_both_8x400_sw36 recipes/configs/ptb_basis_both.yaml --dense_warmup_epochs 36 $BASIS
run medium_dense recipes/configs/ptb_dense.yaml $MED
run medium_both_10x400_sw36 recipes/configs/ptb_basis_both.yaml --dense_warmup_epochs 36 --num_basis 10 $BASIS $MED
branch out_8x384_sw30 dense 30 recipes/configs/ptb_basis_output.yaml $BASIS
branch both_8x400_sw30 dense 30 recipes/configs/ptb_basis_both.yaml $BASIS
branch out_8x384_sw36 dense 36 recipes/configs/ptb_basis_output.yaml $BASIS
branch out_8x384_sw36_restart dense 36 recipes/configs/ptb_basis_output.yaml $BASIS --compressed_learning_rate 20
branch both_8x400_sw36 dense 36 recipes/configs/ptb_basis_both.yaml $BASIS
branch both_8x256_sw36 dense 36 recipes/configs/ptb_basis_both.yaml $BASIS --num_clusters 256
branch both_8x1024_sw36 dense 36 recipes/configs/ptb_basis_both.yaml $BASIS --num_clusters 1024
branch quant2_both_sw36 dense 36 recipes/configs/ptb_quant.yaml --basis_modules both --nbit 2
branch quant4_both_sw36 dense 36 recipes/configs/ptb_quant.yaml --basis_modules both --nbit 4
branch dense_tuned_out_sw36 dense 36 recipes/configs/ptb_dense.yaml --basis_optimizer adam --basis_learning_rate 1e-2 --basis_modules output
branch dense_tuned_both_sw36 dense 36 recipes/configs/ptb_dense.yaml --basis_optimizer adam --basis_learning_rate 1e-2 --basis_modules both
branch out_8x384_sw38 dense 38 recipes/configs/ptb_basis_output.yaml $BASIS
wait
