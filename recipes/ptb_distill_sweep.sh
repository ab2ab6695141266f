#!/bin/bash
# Issue 17's distillation runs, for one GPU (run from the repo root; ~25 min on an H100: two rounds of ~12 min).
#   1. the dense teacher (recipes/configs/ptb_dense.yaml, 40 epochs), beside two runs that need no teacher: the
#      8 x 400 input + output layers converted at epoch 10 (plain, no PQ-aware phase), and a capacity bound, the
#      output layer at 8 x 4096 clusters converted at 10 (does the gap close with ~10x more centroids?);
#   2. as soon as the teacher is saved, side by side: the 8 x 384 output layer converted at 10 and distilled for the
#      other 30 epochs (alpha 0.5 / tau 1 and alpha 0.9 / tau 2), the 8 x 400 input + output layers the same way
#      (alpha 0.5 / tau 1), and the equally tuned reference, a dense student distilled the same way after epoch 10.
# Logs and outputs in $RUNS (runs/); each run's results.json in $RUNS/NAME/.
#   PTB_DIR=path/to/ptb bash recipes/ptb_distill_sweep.sh     (EPOCHS=4 EXTRA="--max_train_tokens 8000": smoke test)
# TEACHER_EPOCHS (default EPOCHS) trains the teacher for fewer epochs, so that the students start sooner: the dense
# recipe's learning rate falls on plateaus, not on a fixed schedule, so a 22-epoch run is the 40-epoch run's first 22
# epochs (valid perplexity 98.5 vs 97.7 at 40, recipes/results/ptb_pqa_dense_40ep.json). STUDENTS=0 stops after
# round 1 (the teacher saved for a later round 2: RUNS=the same folder SKIP_ROUND1=1). A teacher already saved in
# $RUNS/teacher (trained on another machine, say) is reused: round 1 then runs its other two runs beside round 2.
# BRANCH=1 saves GPU time: the teacher saves a checkpoint every epoch, and the students (the equally tuned dense one
# too) start from its epoch-10 checkpoint at the learning rate the plateau schedule had then (20) and train the other
# 30 epochs, instead of each training the same 10 dense epochs first (the teacher is their first 10 epochs). Round 2
# then runs six students: no alpha 0.9, but an 8 x 4096 output layer, and the dense and 8 x 384 output students
# without a teacher (*_branch10_plain: the plain recipes with the students' schedule). It needs a teacher this mode
# trained (a reused one without its epoch checkpoints stops the sweep with a message). Side by side the runs share
# the GPU's throughput rather than add to it (three distilled students on an H100: 24 s an epoch each, ~0.13 epochs/s
# in all; four plain runs on an H200: ~0.15), so six take ~25 min: pick with ONLY.
# PATIENCE=N: the students' learning rate falls by 4 only after N + 1 epochs without a better validation perplexity
# (ptb_dense.yaml's patience 0 cuts it at the first epoch that does not improve, however small the rise); their
# names end in _pN. ONLY="NAME ...": run only these (names as in the logs, e.g. "out_8x384_branch10_a0.5_t1_p1").
# The teacher alone on a CPU (2 cores: 46 min for 22 epochs, valid 97.87, test 93.12; its final files and its
# epoch-10 checkpoint are ~37 MB to carry to the GPU as $RUNS/teacher):
#   BRANCH=1 TEACHER_EPOCHS=22 STUDENTS=0 ONLY=teacher OMP_NUM_THREADS=2 bash recipes/ptb_distill_sweep.sh
set -u
D=${PTB_DIR:-../shared/data/ptb}; R=${RUNS:-runs}; E=${EPOCHS:-40}; mkdir -p $R
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
COMMON="--data_dir $D --disable_tqdm true --logging_steps 500 --logging_nan_inf_filter false --report_to none --num_train_epochs $E ${EXTRA:-}"
OUTPUT=recipes/configs/ptb_basis_output.yaml; BOTH=recipes/configs/ptb_basis_both.yaml; DENSE=recipes/configs/ptb_dense.yaml
AT() { echo $(($1 * E / 40)); }  # epoch N of 40, scaled to EPOCHS
run() { local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  ( python3 recipes/train_ptb.py "$1" $COMMON "${@:2}" --output_dir $R/$name --cache_dir $R/cache_$name > $R/$name.log 2>&1
    echo "exit $?" >> $R/$name.log ) & }
TEACHER=  # the teacher's job, when this sweep trains it
if [ "${SKIP_ROUND1:-0}" != 1 ]; then
  if [ -f $R/teacher/config.json ]; then echo "the teacher saved in $R/teacher is reused"
  else
    SAVE=; [ "${BRANCH:-0}" = 1 ] && SAVE="--save_strategy epoch"
    run teacher $DENSE --num_train_epochs ${TEACHER_EPOCHS:-$E} $SAVE; TEACHER=$!
  fi
  run both_8x400_plain10 $BOTH --dense_warmup_epochs $(AT 10) --pq_aware_epochs 0
  run out_8x4096_plain10 $OUTPUT --dense_warmup_epochs $(AT 10) --num_clusters 4096
fi
if [ "${STUDENTS:-1}" = 1 ]; then
  [ -z "$TEACHER" ] || wait $TEACHER
  # START: how a student starts (dense for 10 epochs, or from the teacher's epoch-10 checkpoint); A: the distillation
  START="--dense_warmup_epochs $(AT 10) --continue_learning_rate true"; TAG=kd10; CK=
  if [ "${BRANCH:-0}" = 1 ]; then  # the teacher's checkpoint after epoch AT 10: its trainer_state's top-level epoch
    # (indented 2; the log_history entries inside repeat "epoch" deeper)
    CK=$(grep -l "^  \"epoch\": $(AT 10).0," $R/teacher/checkpoint-*/trainer_state.json 2>/dev/null | head -1)
    [ -n "$CK" ] || echo "no epoch-$(AT 10) checkpoint in $R/teacher (BRANCH=1 needs a teacher this mode trained):" \
      "no students"
    START="--init_from $(dirname "$CK") --learning_rate 20 --num_train_epochs $((E - $(AT 10))) --dense_warmup_epochs 0"
    TAG=branch10
  fi
  if [ "${BRANCH:-0}" != 1 ] || [ -n "$CK" ]; then
    A="--distill_from $R/teacher --distill_alpha 0.5 --distill_temperature 1"; P=
    if [ "${PATIENCE:-0}" != 0 ]; then
      START="$START --lr_scheduler_kwargs {\"factor\":0.25,\"patience\":$PATIENCE,\"threshold\":0.0}"; P=_p$PATIENCE
    fi
    run out_8x384_${TAG}_a0.5_t1$P $OUTPUT $START $A
    run both_8x400_${TAG}_a0.5_t1$P $BOTH $START --pq_aware_epochs 0 $A
    run dense_${TAG}_a0.5_t1$P $DENSE $START $A
    if [ "$TAG" = branch10 ]; then  # capacity bound under distillation: does 8 x 4096 (head 2.3x) close the gap to
      run out_8x4096_${TAG}_a0.5_t1$P $OUTPUT $START --num_clusters 4096 $A  # the dense student?
      run dense_${TAG}_plain$P $DENSE $START  # no teacher: the plain recipes with the students' schedule
      run out_8x384_${TAG}_plain$P $OUTPUT $START
    else run out_8x384_${TAG}_a0.9_t2 $OUTPUT $START $A --distill_alpha 0.9 --distill_temperature 2; fi  # later wins
  fi
fi
wait
grep -H "test perplexity" $R/*.log
