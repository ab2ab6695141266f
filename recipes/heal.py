#!/usr/bin/env python
"""Heal a converted model: distill its dense original into it, measure before / after, save it.

    python recipes/heal.py [CONFIG.yaml] --teacher DIR (--student DIR | --num_basis 16 --num_clusters 256 ...)
                           (--data_dir DIR | --dataset NAME) --output_dir OUT [--any TrainingArguments field]

The teacher is the dense checkpoint; the student is either an hf_basis checkpoint (`--student`) or the teacher
converted here (`--method`, `--num_basis`, `--num_clusters`, `--nbit`, `--modules`). Training data: the first
`--max_sentences` non-empty lines of DIR/ptb.train.txt (or DIR/train.txt) with `--data_dir`, or the `text` column of
a datasets dataset's train split with `--dataset`; evaluation: the first `--eval_sentences` lines of the test file
(ptb.test.txt / test.txt, or the test split). Encoders (no output layer) are distilled on `last_hidden_state` and
measured by the mean cosine of their sentence embeddings (mean pooling + normalisation, as sentence-transformers does)
against the teacher's; language models are distilled on `logits` and measured by test perplexity.

Writes OUT (the healed hf_basis checkpoint + tokenizer + a model card with the metrics before and after healing) and
OUT/results.json. Without a learning rate the DistillationTrainer's defaults apply (see hf_basis.DistillationTrainer).
"""

from __future__ import annotations

import json
import sys

import yaml
from transformers import HfArgumentParser, TrainingArguments

from hf_basis.healing import HealArguments, heal

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> tuple[HealArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((HealArguments, TrainingArguments))
    # group_by_length: batches of sentences of similar length pad little (PTB, MiniLM with the encoder training, 63
    # steps on CPU: 124 s on 1 thread against 451 s on 2 threads with random batches)
    parser.set_defaults(output_dir="outputs/heal", report_to="none", save_strategy="no", logging_steps=10,
                        num_train_epochs=1, per_device_train_batch_size=32,
                        train_sampling_strategy="group_by_length")  # fmt: skip
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0), encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        unknown = sorted(set(config) - {action.dest for action in parser._actions})
        if unknown:
            parser.error(f"unknown fields in the YAML config: {', '.join(unknown)}")
        parser.set_defaults(**config)
    heal_args, training = parser.parse_args_into_dataclasses(args=argv)
    try:
        heal_args.check()
    except ValueError as err:
        parser.error(str(err))
    return heal_args, training


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    heal_args, training = parse_args(argv)
    results = heal(heal_args, training, command="python recipes/heal.py " + " ".join(argv))
    print(json.dumps({k: results[k] for k in ("before_healing", "after_code_refit", "after_healing")}))
    return results


if __name__ == "__main__":
    main()
