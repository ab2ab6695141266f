"""The shared body of train_ptb.py and train_wikitext.py: arguments, model, phases (dense warm-up -> convert ->
compressed), final evaluation, summary and results.json.

    recipes/train_ptb.py [CONFIG.yaml] [--any_field value ...]

The YAML file (optional, first argument) replaces the recipe's defaults; flags on the command line override both.
Every field of ModelArguments, DataArguments, CompressionArguments and transformers.TrainingArguments is accepted.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import yaml
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    HfArgumentParser,
    LlamaConfig,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import TensorBoardCallback

import hf_basis
from hf_basis.integrations.distributed import SameCompressedStateCallback, broadcast_compressed_state
from hf_basis.models.lstm import LSTMLMConfig
from lm_data import CORPORA, BlockDataset, BPTTBatches, build_tokenizer, load_corpus, token_stream, tokenize
from lm_trainer import (
    BASIS_OPTIMIZERS,
    BPTTTrainer,
    LMTrainer,
    PerplexityMetric,
    StopOnInterrupt,
    basis_optimizer_error,
    distillation_error,
    token_nll,
)

__all__ = ["CompressionArguments", "DataArguments", "ModelArguments", "main", "parse_args"]

ARCHITECTURES = ("lstm_lm", "gpt2", "llama")
COMPRESSIONS = ("none", "basis", "quant")
PQ_WEIGHTINGS = ("uniform", "frequency")
BASIS_MODULES = ("both", "input", "output")
DISTILL_PHASES = ("last", "all")


@dataclass
class ModelArguments:
    architecture: str = field(default="lstm_lm", metadata={"help": f"one of {ARCHITECTURES}"})
    emsize: int = field(default=200, metadata={"help": "embedding width (hidden size for gpt2 / llama)"})
    nhid: int = field(default=200, metadata={"help": "LSTM hidden units (lstm_lm only)"})
    nlayers: int = field(default=2, metadata={"help": "RNN layers / transformer blocks"})
    rnn_type: str = field(default="LSTM", metadata={"help": "LSTM, GRU, RNN_TANH or RNN_RELU (lstm_lm only)"})
    n_head: int = field(default=4, metadata={"help": "attention heads (gpt2 / llama only)"})
    dropout: float = 0.2
    tie_word_embeddings: bool = field(default=False, metadata={"help": "share embedding and head (emsize == nhid)"})
    init_from: str | None = field(
        default=None, metadata={"help": "start from this trained dense model folder (its tokenizer too, if saved)"}
    )


@dataclass
class DataArguments:
    corpus: str = field(default="ptb", metadata={"help": f"one of {sorted(CORPORA)}"})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "folder with the canonical files (ptb.{train,valid,test}.txt, wiki.{train,valid,test}.tokens"
                          " or .raw); default: the Hub copy"},
    )
    dict: str | None = field(default=None, metadata={"help": "vocabulary file, one word per line (else: from train)"})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder"})
    bptt: int = field(default=35, metadata={"help": "truncated-BPTT window (lstm_lm) / block size (gpt2, llama)"})
    max_train_tokens: int | None = field(default=None, metadata={"help": "use only the first N train tokens"})
    max_eval_tokens: int | None = field(default=None, metadata={"help": "use only the first N valid / test tokens"})
    preprocessing_num_workers: int | None = None


@dataclass
class CompressionArguments:
    compression: str = field(default="none", metadata={"help": f"one of {COMPRESSIONS}"})
    num_basis: int = field(default=8, metadata={"help": "basis: sub-vectors per word"})
    num_clusters: int = field(default=256, metadata={"help": "basis: centroids per sub-space"})
    basis_modules: str = field(default="both", metadata={"help": "both, input or output"})
    nbit: int = field(default=4, metadata={"help": "quant: bits per value"})
    dense_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "train dense for N of the --num_train_epochs, then convert and train the rest (--max_steps "
                          "is split in the same ratio); 0: convert before training. With --compression none and "
                          "--basis_optimizer adam: the dense model's layers in --basis_modules take the Adam steps "
                          "after N epochs (the equally tuned dense reference)"},
    )
    continue_learning_rate: bool = field(
        default=False,
        metadata={"help": "with --lr_scheduler_type reduce_lr_on_plateau: the phase after the conversion starts at "
                          "the learning rate the dense phase ended with (its reductions carry over); false: it "
                          "restarts at --learning_rate (or --compressed_learning_rate)"},
    )
    pq_aware_epochs: float = field(
        default=0.0,
        metadata={"help": "basis: the last N epochs of the dense warm-up (<= --dense_warmup_epochs) are a phase of "
                          "PQ-aware training of the layers in --basis_modules (hf_basis.prepare_pq_aware_training: "
                          "they compute with their product quantization, the centroids train, and every "
                          "--pq_refresh_steps steps each word takes the codes nearest to its dense row, which keeps "
                          "its own gradient); the conversion keeps that codebook, so it changes nothing"},
    )
    pq_refresh_steps: int = field(
        default=10, metadata={"help": "with --pq_aware_epochs: optimizer steps between two codebook refreshes"}
    )
    pq_pull: float = field(
        default=1.0,
        metadata={"help": "with --pq_aware_epochs: at each refresh move the dense rows this fraction (0..1) of the way "
                          "back to their decoded rows (1: only the gradient steps since the last refresh decide a "
                          "change of codes)"},
    )
    compression_seed: int = 0
    pq_weighting: str = field(
        default="uniform",
        metadata={"help": f"basis: one of {PQ_WEIGHTINGS}; frequency weights each word's row in the k-means by its"
                          " count in the training tokens (the frequent words get the most accurate rows)"},
    )
    pq_calibration_batches: int = field(
        default=0,
        metadata={"help": "basis, output layer: fit its codebook to the error of the logits, with the second moment "
                          "of the lm_head's input over the first N training batches (0: plain k-means)"},
    )
    compressed_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the phase after the conversion (default: --learning_rate)"}
    )
    centroid_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the basis centroids after the conversion (default: that of the phase);"
                          " a centroid's gradient sums the gradients of all the words that share it"},
    )
    basis_optimizer: str = field(
        default="same",
        metadata={"help": f"one of {BASIS_OPTIMIZERS}: same (the phase's optimizer) or adam (with --optim sgd: after "
                          "the conversion the basis layers' centroids and output bias take Adam steps of "
                          "--basis_learning_rate, decayed linearly to 0 over the phase; the rest keeps SGD)"},
    )
    basis_learning_rate: float | None = field(
        default=None, metadata={"help": "Adam's step size for --basis_optimizer adam (PTB: 1e-2)"}
    )
    # Knowledge distillation: how the phases train, like the optimizer settings above (and recorded with them).
    distill_from: str | None = field(
        default=None,
        metadata={"help": "distill from this trained dense model folder (same architecture and tokenizer, e.g. the "
                          "output_dir of a ptb_dense.yaml run): the training loss of the phases in --distill_phases "
                          "becomes A * tau^2 KL(teacher || student) + (1 - A) * cross-entropy on the labels "
                          "(A = --distill_alpha, tau = --distill_temperature); evaluation stays the label perplexity"},
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "with --distill_from: the KL's weight, in [0, 1]"})
    distill_temperature: float = field(default=1.0, metadata={"help": "with --distill_from: tau > 0 of the KL"})
    distill_phases: str = field(
        default="last",
        metadata={"help": f"with --distill_from: one of {DISTILL_PHASES}; last: the phase after --dense_warmup_epochs "
                          "(the whole run without one), all: the dense warm-up and PQ-aware phases too. With "
                          "--compression none and --dense_warmup_epochs N the dense model is distilled after N "
                          "epochs: the equally tuned reference of a distilled compressed run"},
    )


def parse_args(argv: list[str] | None = None, defaults: dict | None = None):
    """(ModelArguments, DataArguments, CompressionArguments, TrainingArguments) from [CONFIG.yaml] [--flags]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, CompressionArguments, TrainingArguments))
    parser.set_defaults(**(defaults or {}))
    if argv and argv[0].endswith((".yaml", ".yml")):
        with open(argv.pop(0), encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            parser.error(f"unknown fields in the YAML config: {', '.join(unknown)}")
        parser.set_defaults(**config)
    try:
        model_args, data_args, comp_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments' own checks: one line and exit 2, like every other bad option
        parser.error(" ".join(str(err).split()))
    if model_args.architecture not in ARCHITECTURES:
        parser.error(f"--architecture must be one of {ARCHITECTURES}")
    if comp_args.compression not in COMPRESSIONS:
        parser.error(f"--compression must be one of {COMPRESSIONS}")
    if comp_args.pq_weighting not in PQ_WEIGHTINGS:
        parser.error(f"--pq_weighting must be one of {PQ_WEIGHTINGS}")
    if comp_args.pq_weighting == "frequency" and comp_args.compression != "basis":
        parser.error("--pq_weighting frequency needs --compression basis (it weights the product-quantization k-means)")
    if comp_args.pq_calibration_batches < 0:
        parser.error("--pq_calibration_batches must be >= 0")
    if comp_args.pq_calibration_batches and (
        comp_args.compression != "basis" or comp_args.basis_modules == "input" or model_args.tie_word_embeddings
    ):
        parser.error("--pq_calibration_batches needs --compression basis with an untied output layer in "
                     "--basis_modules (output or both)")
    error = basis_optimizer_error(comp_args.basis_optimizer, comp_args.basis_learning_rate,
                                  comp_args.centroid_learning_rate, training_args.optim)
    if error:
        parser.error(error)
    if comp_args.basis_optimizer == "adam" and comp_args.compression == "quant":
        parser.error("--basis_optimizer adam needs --compression basis (or none: the dense reference with the same "
                     "treatment); quant layers do not train")
    if comp_args.distill_phases not in DISTILL_PHASES:
        parser.error(f"--distill_phases must be one of {DISTILL_PHASES}")
    error = distillation_error(comp_args.distill_alpha, comp_args.distill_temperature)
    if error:
        parser.error(f"--{error}")
    if comp_args.distill_from is None:
        unset = CompressionArguments()
        if any(getattr(comp_args, name) != getattr(unset, name)
               for name in ("distill_alpha", "distill_temperature", "distill_phases")):
            parser.error("--distill_alpha, --distill_temperature and --distill_phases need --distill_from")
    elif not os.path.isfile(os.path.join(comp_args.distill_from, "config.json")):
        parser.error(f"--distill_from must be a saved model folder (with config.json), got {comp_args.distill_from}")
    if (comp_args.compression == "none" and comp_args.dense_warmup_epochs and comp_args.basis_optimizer != "adam"
            and comp_args.distill_from is None):
        parser.error("--dense_warmup_epochs needs --compression basis or quant (or, for the equally tuned dense "
                     "reference, --compression none with --basis_optimizer adam or --distill_from)")
    if comp_args.basis_modules not in BASIS_MODULES:
        parser.error(f"--basis_modules must be one of {BASIS_MODULES}")
    if comp_args.pq_aware_epochs < 0 or comp_args.pq_refresh_steps < 1 or not 0 <= comp_args.pq_pull <= 1:
        parser.error("--pq_aware_epochs must be >= 0, --pq_refresh_steps >= 1 and --pq_pull in [0, 1]")
    if comp_args.pq_aware_epochs and not (
        comp_args.compression == "basis" and 0 < comp_args.pq_aware_epochs <= comp_args.dense_warmup_epochs
        and not model_args.tie_word_embeddings and not comp_args.pq_calibration_batches
    ):
        parser.error("--pq_aware_epochs needs --compression basis, --dense_warmup_epochs >= it, untied layers and no "
                     "--pq_calibration_batches (the conversion keeps the trained codebook)")
    if comp_args.dense_warmup_epochs and comp_args.dense_warmup_epochs >= training_args.num_train_epochs:
        parser.error("--dense_warmup_epochs must be smaller than --num_train_epochs (the total)")
    # The loss and the perplexity read the aligned targets; the Trainer must pass them to the metric.
    training_args.label_names = ["labels", "shift_labels"]
    return model_args, data_args, comp_args, training_args


def _tokenizer(model_args: ModelArguments, data_args: DataArguments, raw):
    if data_args.dict:
        return build_tokenizer(vocab_file=data_args.dict)
    if model_args.init_from and os.path.isfile(os.path.join(model_args.init_from, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(model_args.init_from)

    def lines():
        for batch in raw["train"].iter(batch_size=10_000):
            yield from batch["text"]

    return build_tokenizer(lines())


def build_model(model_args: ModelArguments, data_args: DataArguments, vocab_size: int, eos_token_id: int) -> nn.Module:
    if model_args.init_from:
        model = AutoModelForCausalLM.from_pretrained(model_args.init_from)
        if model.get_input_embeddings().num_embeddings != vocab_size:
            raise ValueError(
                f"{model_args.init_from} has a vocabulary of {model.get_input_embeddings().num_embeddings} words, the "
                f"tokenizer {vocab_size}: use the tokenizer saved with that model (or the same --dict)"
            )
        return model
    m = model_args
    if m.architecture == "lstm_lm":
        config = LSTMLMConfig(
            vocab_size=vocab_size, emsize=m.emsize, nhid=m.nhid, nlayers=m.nlayers, rnn_type=m.rnn_type,
            dropout=m.dropout, tie_word_embeddings=m.tie_word_embeddings, eos_token_id=eos_token_id,
        )
    elif m.architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=data_args.bptt, n_embd=m.emsize, n_layer=m.nlayers, n_head=m.n_head,
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
            tie_word_embeddings=m.tie_word_embeddings, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=m.emsize, intermediate_size=4 * m.emsize, num_hidden_layers=m.nlayers,
            num_attention_heads=m.n_head, num_key_value_heads=m.n_head, max_position_embeddings=data_args.bptt,
            attention_dropout=m.dropout, tie_word_embeddings=m.tie_word_embeddings,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
        )
    return AutoModelForCausalLM.from_config(config)


def load_teacher(comp_args: CompressionArguments, model: nn.Module, tokenizer) -> nn.Module | None:
    """The --distill_from model, checked against the student before any training: the same model type (a stateful
    LSTM needs a teacher whose state it can carry), a dense output layer and the same vocabulary, word for word where
    the teacher's folder holds its tokenizer."""
    if comp_args.distill_from is None:
        return None
    path = comp_args.distill_from
    teacher = AutoModelForCausalLM.from_pretrained(path)
    if teacher.config.model_type != model.config.model_type:
        raise ValueError(f"--distill_from {path} is a {teacher.config.model_type} model, the student a "
                         f"{model.config.model_type}: distill from the same architecture")
    head = teacher.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"--distill_from {path} must be a dense model; its output layer is a {type(head).__name__}")
    if head.out_features != len(tokenizer):
        raise ValueError(f"--distill_from {path} predicts {head.out_features} words, the tokenizer has "
                         f"{len(tokenizer)}: distill from a model trained with the same tokenizer")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"--distill_from {path} was trained with another vocabulary (its tokenizer.json maps "
                             "words to other ids): use the same corpus / --dict")
    return teacher


def _distillation_record(comp_args: CompressionArguments) -> dict | None:
    """results.json's summary of the distillation: the teacher (and its own results, when it has them) and the loss."""
    if comp_args.distill_from is None:
        return None
    teacher_results = os.path.join(comp_args.distill_from, "results.json")
    teacher_test = None
    if os.path.isfile(teacher_results):
        with open(teacher_results, encoding="utf-8") as f:
            teacher_test = json.load(f).get("test_perplexity")
    return {"teacher": os.path.abspath(comp_args.distill_from), "teacher_test_perplexity": teacher_test,
            "alpha": comp_args.distill_alpha, "temperature": comp_args.distill_temperature,
            "phases": comp_args.distill_phases}


def embedding_head_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the input embedding and the output layer together: every parameter and buffer they
    hold (codes, centroids, packed values, bias...), shared tensors (tied weights, a shared codebook) counted once."""
    seen: set[int] = set()
    params = nbytes = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:
            continue
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            nbytes += tensor.numel() * tensor.element_size()
            params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
    return params, nbytes


def _datasets(model_args, data_args, training_args, streams):
    if model_args.architecture == "lstm_lm":
        def layout(stream, batch_size):
            rank, world_size = training_args.process_index, training_args.world_size
            return BPTTBatches(stream, batch_size, data_args.bptt, rank, world_size)

        return (layout(streams["train"], training_args.per_device_train_batch_size),
                layout(streams["validation"], training_args.per_device_eval_batch_size),
                layout(streams["test"], training_args.per_device_eval_batch_size))
    return tuple(BlockDataset(streams[split], data_args.bptt) for split in ("train", "validation", "test"))


def _trainer(model, args, model_args, datasets, tokenizer, metric, stopper, comp_args=None, callbacks=(),
             teacher=None, distill_args=None):
    """The phase's Trainer; `comp_args` (the phase after a conversion) sets the basis parameters' optimizer;
    `teacher` (with `distill_args`: --distill_alpha and --distill_temperature) makes it distill."""
    cls = BPTTTrainer if model_args.architecture == "lstm_lm" else LMTrainer
    distill = {} if teacher is None else {"teacher": teacher, "distill_alpha": distill_args.distill_alpha,
                                          "distill_temperature": distill_args.distill_temperature}
    return cls(
        **distill,
        centroid_learning_rate=comp_args.centroid_learning_rate if comp_args else None,
        basis_optimizer=comp_args.basis_optimizer if comp_args else "same",
        basis_learning_rate=comp_args.basis_learning_rate if comp_args else None,
        adam_layers=LAYERS_OF[comp_args.basis_modules] if comp_args else None,
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        data_collator=default_data_collator,
        processing_class=tokenizer,
        compute_metrics=metric,
        preprocess_logits_for_metrics=token_nll,
        callbacks=[stopper, SameCompressedStateCallback(), *callbacks],  # several processes: same codes everywhere
    )


LAYERS_OF = {"both": ("input", "output"), "input": ("input",), "output": ("output",)}


@dataclass
class Phase:
    name: str
    epochs: float
    max_steps: int  # <= 0: by epochs
    after_switch: bool  # the phase after --dense_warmup_epochs (compressed, or the tuned dense reference)


def _phases(comp_args: CompressionArguments, total_epochs: float, max_steps: int) -> list[Phase]:
    """The run's phases. --num_train_epochs and --max_steps are the whole run's; --dense_warmup_epochs takes its
    share of either (dense_warmup_epochs / num_train_epochs of --max_steps), the phase after the switch the rest;
    --pq_aware_epochs are the last of the warm-up's epochs, a phase of their own."""
    if comp_args.compression != "none":
        after = comp_args.compression
    elif comp_args.basis_optimizer == "adam":  # dense; its layers in --basis_modules take Adam steps after the switch
        after = "dense-tuned"
    elif comp_args.dense_warmup_epochs and comp_args.distill_from:  # dense, distilled after the switch
        after = "dense-distilled"
    else:
        after = "dense"
    if not comp_args.dense_warmup_epochs:
        return [Phase(after, total_epochs, max_steps, after != "dense")]
    warmup, pq_aware = comp_args.dense_warmup_epochs, comp_args.pq_aware_epochs

    def steps(epochs):
        return round(max_steps * epochs / total_epochs) if max_steps > 0 else -1

    warmup_steps = steps(warmup)
    rest_steps = max_steps - warmup_steps if max_steps > 0 else -1
    dense_epochs = warmup - pq_aware
    dense_steps = steps(dense_epochs)
    phases = [Phase("dense", dense_epochs, dense_steps, False)] if dense_epochs > 0 else []
    if pq_aware:
        phases.append(Phase("pq-aware", pq_aware, warmup_steps - dense_steps if max_steps > 0 else -1, False))
    return phases + [Phase(after, total_epochs - warmup, rest_steps, True)]


def _convert(model, comp_args: CompressionArguments, train_dataset, token_counts: torch.Tensor | None = None) -> None:
    """token_counts: (vocab,) training-token counts, passed as token_frequencies (--pq_weighting frequency).
    train_dataset: its first --pq_calibration_batches items give the lm_head's input moment (activation-aware PQ)."""
    def calibration_batches():
        for i in range(min(comp_args.pq_calibration_batches, len(train_dataset))):
            ids = train_dataset[i]["input_ids"]
            yield ids if ids.dim() == 2 else ids[None]  # BPTTBatches items are batches, BlockDataset items blocks

    moment = hf_basis.head_input_moment(model, calibration_batches()) if comp_args.pq_calibration_batches else None
    hf_basis.convert(
        model, num_basis=comp_args.num_basis, num_clusters=comp_args.num_clusters, method=comp_args.compression,
        nbit=comp_args.nbit, modules=comp_args.basis_modules, seed=comp_args.compression_seed,
        token_frequencies=token_counts, head_input_moment=moment,
    )
    # Several processes: each converted its own copy (the LSTM's ranks even calibrate on their own streams); train
    # rank 0's everywhere (FSDP2 would not copy the buffers; DDP would, silently).
    broadcast_compressed_state(model)


@contextlib.contextmanager
def _tensorboard_run(args: TrainingArguments, phase: str | None):
    """--report_to tensorboard: each phase's Trainer logs to OUTPUT_DIR/runs/PHASE (one TensorBoard run a phase: the
    Trainer counts steps from 0 in each), unless TENSORBOARD_LOGGING_DIR says where. Read when the Trainer is built."""
    if phase is None or "tensorboard" not in (args.report_to or []) or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(args.output_dir, "runs", phase)
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


def _learning_rate_after_switch(trainer, comp_args: CompressionArguments, training_args: TrainingArguments) -> float:
    """The first learning rate of the phase after the switch: where the dense phase's reduce_lr_on_plateau left it
    (--continue_learning_rate), else --compressed_learning_rate or --learning_rate."""
    if comp_args.compressed_learning_rate is not None:
        return comp_args.compressed_learning_rate
    return _continued_learning_rate(trainer, comp_args, training_args)


def _continued_learning_rate(trainer, comp_args: CompressionArguments, training_args: TrainingArguments) -> float:
    """Where the previous phase's reduce_lr_on_plateau left the learning rate (--continue_learning_rate), else
    --learning_rate."""
    if (comp_args.continue_learning_rate and trainer is not None and trainer.optimizer is not None
            and training_args.lr_scheduler_type == "reduce_lr_on_plateau"):
        return trainer.optimizer.param_groups[0]["lr"]
    return training_args.learning_rate


def _describe_conversion(model, comp_args: CompressionArguments) -> str:
    if comp_args.compression == "none" and comp_args.basis_optimizer == "adam":
        return f"dense, {'+'.join(LAYERS_OF[comp_args.basis_modules])} layer(s) now take Adam steps"
    if comp_args.compression == "none":  # the distilled dense reference: only the loss changes
        return "dense, now distilled from the teacher"
    layers = hf_basis.report(model).to_dict()["layers"]
    return "converted " + ", ".join(f"{layer['name']} to {layer['kind']}" for layer in layers) + (
        f" ({comp_args.num_basis} x {comp_args.num_clusters})" if comp_args.compression == "basis"
        else f" ({comp_args.nbit} bit)")


def _summary_table(results: dict) -> str:
    def human(n):
        return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

    rows = [
        ("run", results["run_name"]),
        ("compression", results["compression"]),
        ("valid perplexity", f"{results['eval_perplexity']:.2f}"),
        ("test perplexity", f"{results['test_perplexity']:.2f}"),
        ("embedding+head parameters", f"{results['emb_head_params_before']:,} -> {results['emb_head_params_after']:,}"),
        ("embedding+head bytes",
         f"{human(results['emb_head_bytes_before'])} -> {human(results['emb_head_bytes_after'])}"),
        ("compression ratio", f"{results['compression_ratio']:.2f}x"),
        ("train tokens/s", f"{results['train_tokens_per_second']:,.0f}"),
        ("epochs trained", f"{results['epochs_trained']:.2f}" + (" (interrupted)" if results["interrupted"] else "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None, defaults: dict | None = None) -> dict:
    model_args, data_args, comp_args, training_args = parse_args(argv, defaults)
    set_seed(training_args.seed)

    raw = load_corpus(data_args.corpus, data_args.data_dir, data_args.cache_dir)
    tokenizer = _tokenizer(model_args, data_args, raw)
    ids = tokenize(raw, tokenizer, data_args.preprocessing_num_workers)
    streams = {
        split: token_stream(ids[split], data_args.max_train_tokens if split == "train" else data_args.max_eval_tokens)
        for split in ("train", "validation", "test")
    }
    datasets = _datasets(model_args, data_args, training_args, streams)
    # Frequency-weighted PQ: each word's count in the tokens actually trained on (after --max_train_tokens).
    token_counts = (
        torch.bincount(streams["train"], minlength=len(tokenizer)) if comp_args.pq_weighting == "frequency" else None
    )

    model = build_model(model_args, data_args, len(tokenizer), tokenizer.eos_token_id)
    teacher = load_teacher(comp_args, model, tokenizer)
    params_before, bytes_before = embedding_head_size(model)
    use_cache = model.config.use_cache
    metric = PerplexityMetric()
    stopper = StopOnInterrupt().install()

    trainer = None
    log_history, runtime, tokens, epochs_trained, switch = [], 0.0, 0, 0.0, None
    phases = _phases(comp_args, training_args.num_train_epochs, training_args.max_steps)
    try:
        for phase in phases:
            if stopper.requested:  # Ctrl-C during an earlier phase or a conversion: no further phase
                stopper.interrupted = True
                break
            args = copy.deepcopy(training_args)
            args.num_train_epochs, args.max_steps = phase.epochs, phase.max_steps
            if phase.after_switch:
                args.learning_rate = _learning_rate_after_switch(trainer, comp_args, training_args)
            elif phase.name == "pq-aware":  # the dense training goes on, against the codebook
                args.learning_rate = _continued_learning_rate(trainer, comp_args, training_args)
            if len(phases) > 1 and training_args.save_strategy != "no":  # checkpoints of each phase apart
                args.output_dir = os.path.join(training_args.output_dir, f"phase-{phase.name}")
            if phase.after_switch and trainer is not None:
                switch = {"after_epochs": epochs_trained, "learning_rate": args.learning_rate,
                          "eval_perplexity_before": trainer.evaluate()["eval_perplexity"]}
            if phase.after_switch and comp_args.compression != "none":
                _convert(model, comp_args, datasets[0], token_counts)
            callbacks = []
            if phase.name == "pq-aware":
                hf_basis.prepare_pq_aware_training(
                    model, comp_args.num_basis, comp_args.num_clusters, modules=comp_args.basis_modules,
                    seed=comp_args.compression_seed, token_frequencies=token_counts,
                )
                callbacks = [hf_basis.PQAwareTrainingCallback(comp_args.pq_refresh_steps, comp_args.pq_pull)]
            distill = teacher is not None and (comp_args.distill_phases == "all" or phase is phases[-1])
            with _tensorboard_run(args, phase.name if len(phases) > 1 else None):
                trainer = _trainer(model, args, model_args, datasets, tokenizer, metric, stopper,
                                   comp_args if phase.after_switch else None, callbacks,
                                   teacher if distill else None, comp_args)
            if switch is not None and "eval_perplexity_after" not in switch:
                switch["eval_perplexity_after"] = trainer.evaluate()["eval_perplexity"]
                switch["converted"] = _describe_conversion(model, comp_args)
                print(f"[hf_basis] switch after {switch['after_epochs']:g} epochs: {switch['converted']}; valid "
                      f"perplexity {switch['eval_perplexity_before']:.2f} -> {switch['eval_perplexity_after']:.2f}; "
                      f"learning rate {args.learning_rate:g}", file=sys.stderr, flush=True)
            if phase.epochs > 0 and phase.max_steps != 0:
                stopper.phase = phase.name
                output = trainer.train()
                # Evaluations after train() would reopen a TensorBoard writer in the phase's folder; event files are
                # named by the second, so in a short phase it would overwrite the training's file. Their numbers are
                # in results.json.
                trainer.remove_callback(TensorBoardCallback)
                runtime += output.metrics["train_runtime"]
                tokens += trainer.train_tokens * training_args.world_size
                epochs_trained += trainer.state.epoch or 0.0
                log_history += [dict(entry, phase=phase.name) for entry in trainer.state.log_history]
        if trainer is None:  # interrupted before the first phase began
            trainer = _trainer(model, copy.deepcopy(training_args), model_args, datasets, tokenizer, metric, stopper)
        stopper.uninstall()  # from here on, Ctrl-C aborts

        valid = trainer.evaluate(datasets[1], metric_key_prefix="eval")
        test = trainer.evaluate(datasets[2], metric_key_prefix="test")
    finally:
        stopper.uninstall()

    params_after, bytes_after = embedding_head_size(model)
    compressed = hasattr(model, "hf_basis_config")
    results = {
        "run_name": training_args.run_name or os.path.basename(os.path.normpath(training_args.output_dir)),
        "corpus": data_args.corpus,
        "architecture": model_args.architecture,
        "compression": comp_args.compression if compressed else "none",
        "eval_perplexity": valid["eval_perplexity"],
        "test_perplexity": test["test_perplexity"],
        "eval_loss": valid["eval_nll"],
        "test_loss": test["test_nll"],
        "eval_tokens": valid["eval_num_tokens"],
        "test_tokens": test["test_num_tokens"],
        "emb_head_params_before": params_before,
        "emb_head_params_after": params_after,
        "emb_head_bytes_before": bytes_before,
        "emb_head_bytes_after": bytes_after,
        "compression_ratio": bytes_before / bytes_after,
        "compressed_modules": hf_basis.report(model).to_dict() if compressed else None,
        "train_tokens": tokens,
        "train_runtime": runtime,
        "train_tokens_per_second": tokens / runtime if runtime else float("nan"),
        "epochs_trained": epochs_trained,
        "switch": switch,
        "distillation": _distillation_record(comp_args),
        "interrupted": stopper.interrupted,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "world_size": training_args.world_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "log_history": log_history,
        "args": {
            "model": asdict(model_args), "data": asdict(data_args), "compression": asdict(comp_args),
            "training": {k: v for k, v in training_args.to_dict().items() if not k.startswith("_")},
        },
    }
    model.config.use_cache = use_cache  # the Trainer sets it to TrainingArguments.use_cache (False)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
        print("\n" + _summary_table(results), flush=True)
    if not math.isfinite(results["test_perplexity"]):
        raise RuntimeError("test perplexity is not finite")
    return results
