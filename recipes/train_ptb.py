#!/usr/bin/env python
"""Train a word-level LSTM language model on Penn Treebank, dense or with compressed embeddings / output layer.

    python recipes/train_ptb.py [CONFIG.yaml] [--any_field value ...]      # or: accelerate launch recipes/train_ptb.py
    python recipes/train_ptb.py recipes/configs/ptb_basis_output.yaml --data_dir ../shared/data/ptb

Without a config the defaults are the PTB setting of Shi & Yu (2018) and of PyTorch's word_language_model:
emsize = nhid = 200, 2 LSTM layers, dropout 0.2, batch 20 x bptt 35 (stateful truncated BPTT), SGD lr 20 divided by 4
when the validation perplexity does not improve, gradient norm clipped at 0.25, seed 1111, 40 epochs, eval batch 10.
Data: the Hub copy of PTB unless --data_dir holds ptb.{train,valid,test}.txt. Ctrl-C stops training, then the model is
evaluated on the validation and test splits and saved with its tokenizer and OUTPUT_DIR/results.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm_data import CorpusNotFound  # noqa: E402
from lm_recipe import main  # noqa: E402

PTB_DEFAULTS = {
    "corpus": "ptb",
    "architecture": "lstm_lm",
    "emsize": 200,
    "nhid": 200,
    "nlayers": 2,
    "dropout": 0.2,
    "bptt": 35,
    "output_dir": "outputs/ptb",
    "num_train_epochs": 40,
    "per_device_train_batch_size": 20,
    "per_device_eval_batch_size": 10,
    "optim": "sgd",
    "learning_rate": 20.0,
    "weight_decay": 0.0,
    "max_grad_norm": 0.25,
    "lr_scheduler_type": "reduce_lr_on_plateau",
    "lr_scheduler_kwargs": {"factor": 0.25, "patience": 0, "threshold": 0.0},
    "metric_for_best_model": "perplexity",
    "greater_is_better": False,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 200,
    "seed": 1111,
    "report_to": "none",
}


def run(defaults: dict) -> None:
    """main() from the shell: a corpus that cannot be read is one line on stderr and exit code 1, not a traceback."""
    try:
        main(defaults=defaults)
    except CorpusNotFound as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    run(PTB_DEFAULTS)
