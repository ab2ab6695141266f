#!/usr/bin/env python
"""Train a word-level language model on WikiText-2 / WikiText-103: the LSTM LM (stateful truncated BPTT) or a small
GPT-2- or Llama-style transformer from scratch (blocks of --bptt tokens), dense or compressed.

    python recipes/train_wikitext.py [CONFIG.yaml] [--any_field value ...]     # or: accelerate launch ...
    python recipes/train_wikitext.py recipes/configs/wikitext2_gpt2.yaml --data_dir DIR   # DIR: wiki.*.tokens

--corpus picks wikitext-2 (default), wikitext-2-raw, wikitext-103 or wikitext-103-raw; the Hub copy
(Salesforce/wikitext) unless --data_dir holds wiki.{train,valid,test}.tokens (.raw for the raw variants).
Defaults are the LSTM setting of train_ptb.py; the GPT-2 / Llama configs switch to AdamW.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm_recipe import main  # noqa: E402, F401  (train_wikitext.main(argv, defaults), as train_ptb.main)
from train_ptb import PTB_DEFAULTS, run  # noqa: E402

WIKITEXT_DEFAULTS = {**PTB_DEFAULTS, "corpus": "wikitext-2", "output_dir": "outputs/wikitext"}

if __name__ == "__main__":
    run(WIKITEXT_DEFAULTS)
