"""Heal a converted model: distill the dense (teacher) model into the compressed (student) one with the Trainer.

    trainer = hf_basis.DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments("out"),
                                           train_dataset=ds, distill_on="last_hidden_state")
    trainer.train()

A `transformers.Trainer` subclass, so logging, checkpoints, resume, accelerate and progress bars come with it. Only
`compute_loss` (the distillation objective) and `create_optimizer` (its own learning rate for the compressed layers)
change; the teacher runs frozen, in eval mode and under `no_grad`.

Objectives (`distill_on`):
  "logits"              tau^2 KL(teacher || student) of the next-token (causal LM) or per-token (masked LM)
                        distributions over the non-padded tokens, mixed with the label loss as
                        alpha * KL + (1 - alpha) * CE (alpha < 1 needs `labels` in the batch). Both models run up
                        to their output layer only (a pre-hook on it stops the forward), so neither model's T x V
                        logits are built by the forward: a basis head's KL is the fused `basis_kl_divergence`, any
                        other head's is computed chunk by chunk of tokens (recomputed in the backward), and the
                        teacher's logits come from its last hidden state one chunk at a time.
  "last_hidden_state"   for encoders (sentence-transformers models): `hidden_loss="pooled_cosine"` (default),
                        1 - cosine of the mean-pooled last hidden states over the non-padded tokens (the sentence
                        embedding sentence-transformers computes); "token_cosine": the same per token, averaged;
                        "pooled_and_token_cosine": their sum (every token's state constrains the student, not only
                        the sentence's mean: +0.003 on all-MiniLM-L6-v2 16 x 256 after 2,000 PTB sentences).

`logits_distillation_loss` is that logits KL for a training loop of one's own that runs the student's ordinary
forward (its label loss, a stateful model's recurrent state) and adds the term: the PTB / WikiText recipes'
`--distill_from`.

Row distillation (basis input embeddings): the teacher's input embedding table is the best target for the codebook's
rows. Before training (`refit_codes=True`) the embedding's codes and centroids are re-fitted to the teacher's rows by
k-means weighted by how often each token occurs in `train_dataset`, the minimiser of the frequency-weighted row
reconstruction error, which re-assigns every word to its nearest centroids (codes cannot move by gradient): on
all-MiniLM-L6-v2 16 x 256 (k-means seed 0) it alone lifts the sentence-embedding cosine on PTB from 0.678 to 0.865. `row_weight` > 0
adds row_weight * mean over the batch's tokens of ||student row - teacher row||^2 / mean ||teacher row||^2 to the
loss (off by default: not measured to help on top of the re-fit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from hf_basis.modules.basis_embedding import BasisEmbedding
from hf_basis.modules.basis_linear import BasisLinear
from hf_basis.modules.codebook import Codebook
from hf_basis.modules.lazy_logits import fused_head_inputs
from hf_basis.ops.basis_cross_entropy import basis_cross_entropy
from hf_basis.ops.basis_kl_divergence import basis_kl_divergence
from hf_basis.ops.logits_kl_divergence import logits_kl_divergence

__all__ = ["DistillationTrainer", "logits_distillation_loss", "refit_embedding_codes", "token_counts"]

DISTILL_ON = ("logits", "last_hidden_state")
TRAIN_CHOICES = ("compressed", "all")
HIDDEN_LOSSES = ("pooled_cosine", "token_cosine", "pooled_and_token_cosine")
# Adam moves every value by ~lr per step whatever its scale, so the default rate is relative to the centroids' RMS:
# 0.05 x RMS, i.e. 2.8e-3 on all-MiniLM-L6-v2 (RMS 0.056; 3e-3 measured there, recipes/results/heal_minilm_*.json)
# and 1e-3 on the tests' tiny models (RMS 0.02; 1e-2 made them worse).
DEFAULT_RELATIVE_LR = 0.05
_DENSE_CHUNK_ELEMENTS = 2**22  # logits per chunk of the unfused (non-basis head) KL


class _HeadReached(Exception):
    """Raised by the pre-hook on a model's output layer to stop the forward once its input is known."""


def _head_input(model: nn.Module, head: nn.Module, inputs: dict) -> torch.Tensor:
    """The activations that enter `head` (the model's output layer) when `model(**inputs)` runs; the head itself
    (and whatever follows it) never runs, so no logits are built."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _HeadReached

    handle = head.register_forward_pre_hook(hook)
    try:
        model(**inputs)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its output layer {type(head).__name__}")
    return captured[0]


def _dense_logits_kl(hidden, head, teacher_hidden, teacher_head, mask, tau):
    """tau^2 KL(teacher || student) summed over masked tokens, for a student head that is not a BasisLinear: one
    chunk of (Tc, V) logits at a time, each chunk recomputed in the backward (activation checkpointing)."""
    T, V = hidden.shape[0], teacher_head.weight.shape[0]
    step = max(1, _DENSE_CHUNK_ELEMENTS // V)

    def chunk_kl(h, th, m):
        with torch.no_grad():
            teacher_logits = teacher_head(th)
        return logits_kl_divergence(head(h), teacher_logits, m, tau, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for t0 in range(0, T, step):
        sl = slice(t0, min(T, t0 + step))
        total = total + checkpoint(chunk_kl, hidden[sl], teacher_hidden[sl], mask[sl].bool(), use_reentrant=False)
    return total


def logits_distillation_loss(logits: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: nn.Module,
                             mask: torch.Tensor | None = None, temperature: float = 1.0,
                             reduction: str = "mean") -> torch.Tensor:
    """tau^2 KL(teacher || student) of the output distributions, from the student's logits as its forward returned
    them and the activations `teacher_hidden` (..., Ht) that entered the teacher's dense output layer `teacher_head`.

    For a training loop that runs the student's ordinary forward (with labels: its own label loss, and for a stateful
    model its recurrent state) and adds the distillation term. A LazyLogits of an armed basis head (training mode,
    labels passed: hf_basis.integrations.fused_loss) is computed by the fused `basis_kl_divergence` from the head's
    inputs, so neither side's T x V logits are built; real logits (a dense head, or basis logits already
    materialised) by `logits_kl_divergence`, the teacher's logits computed here from `teacher_hidden`.
    `mask` (...) bool: the positions that count; reduction "mean" (over them) or "sum". fp32 scalar.
    """
    inputs = fused_head_inputs(logits)
    teacher_hidden = teacher_hidden.detach()
    if inputs is not None and inputs[4] is None:  # (hidden, centroids, codes, bias, softcap): no soft-capping
        hidden, centroids, codes, bias, _ = inputs
        return basis_kl_divergence(hidden, centroids, codes, bias, teacher_hidden, teacher_head.weight,
                                   teacher_head.bias, mask, temperature, reduction)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    return logits_kl_divergence(logits, teacher_logits, mask, temperature, reduction)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def token_counts(dataset: Iterable, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) float counts of the token ids in `dataset`'s `input_ids` (padding excluded where an
    `attention_mask` says so)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for example in dataset:
        ids = torch.as_tensor(example["input_ids"]).reshape(-1).long()
        if "attention_mask" in example:
            ids = ids[torch.as_tensor(example["attention_mask"]).reshape(-1).bool()]
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    return counts


def refit_embedding_codes(embedding: BasisEmbedding, teacher_weight: torch.Tensor, counts: torch.Tensor,
                          seed: int = 0) -> float:
    """Re-fit `embedding`'s codes and centroids to `teacher_weight` (V, D) by k-means weighted by `counts` (V,)
    (plus 1% of the mean count for every token, so unseen tokens keep a usable row). In place; returns the new
    (unweighted) relative error of the rows. A codebook shared with a tied output layer is re-fitted for both."""
    weights = counts.double() + 0.01 * float(counts.mean())
    book = embedding.codebook
    fitted, error = Codebook.from_weight(teacher_weight.detach().to(book.centroids.device, torch.float32),
                                         book.num_basis, book.num_clusters, seed=seed, sample_weight=weights)
    with torch.no_grad():
        book.codes.copy_(fitted.codes)
        book.centroids.copy_(fitted.centroids)
    return error


def _compressed_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the compressed layers: codebook centroids and basis heads' biases, once each."""
    params = {}
    for module in model.modules():
        if isinstance(module, Codebook):
            params[id(module.centroids)] = module.centroids
        elif isinstance(module, BasisLinear) and module.bias is not None:
            params[id(module.bias)] = module.bias
    return list(params.values())


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that trains `model` (the compressed student) to reproduce `teacher_model`.

    Args (besides the Trainer's own, e.g. `args`, `train_dataset`, `data_collator`, `callbacks`):
        teacher_model: the dense model the student was converted from (same tokenizer). Frozen: put in eval mode,
            `requires_grad` off, moved to the training device; its parameters are never changed.
        distill_on: "logits" (causal or masked LMs) or "last_hidden_state" (encoders); see the module docstring.
        temperature: tau > 0 of the logits KL (default 1.0).
        alpha: weight of the distillation loss, in [0, 1]; 1 - alpha weighs the label loss (default 1.0: pure
            distillation, no labels needed). "logits" only.
        train: "compressed" (default: only the compressed layers' centroids and basis biases train) or "all".
        compressed_lr: learning rate of the compressed layers (default None: 0.05 x the RMS of their centroids,
            e.g. 2.8e-3 on all-MiniLM-L6-v2); `args.learning_rate` is used for every other parameter when train="all".
        hidden_loss: "pooled_cosine" (default), "token_cosine" or "pooled_and_token_cosine" (their sum);
            distill_on="last_hidden_state" only.
        row_weight: weight of the row-distillation loss on basis input embeddings (default 0.0: off).
        refit_codes: re-fit the basis input embedding's codes to the teacher's rows, weighted by `train_dataset`'s
            token counts, before training (default True; needs a `train_dataset` with `input_ids`).
        dropout: keep the student's dropout active while healing (default False: the student is trained to
            reproduce the teacher's deterministic outputs, so it runs in eval mode; gradients flow all the same).

    Raises ValueError before touching either model for an argument outside these values.
    """

    def __init__(self, model: nn.Module | None = None, teacher_model: nn.Module | None = None, args=None, *,
                 distill_on: str = "logits", temperature: float = 1.0, alpha: float = 1.0,
                 train: str = "compressed", compressed_lr: float | None = None,
                 hidden_loss: str = "pooled_cosine", row_weight: float = 0.0, refit_codes: bool = True,
                 dropout: bool = False, **kwargs):
        if teacher_model is None or not isinstance(teacher_model, nn.Module):
            raise ValueError("teacher_model must be the dense model (an nn.Module) to distill from")
        if model is None or not isinstance(model, nn.Module):
            raise ValueError("model must be the compressed student (an nn.Module)")
        if distill_on not in DISTILL_ON:
            raise ValueError(f"distill_on must be one of {list(DISTILL_ON)}, got {distill_on!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if alpha < 1.0 and distill_on != "logits":
            raise ValueError('alpha < 1 mixes in the label loss, which only distill_on="logits" has; use alpha=1.0')
        if train not in TRAIN_CHOICES:
            raise ValueError(f"train must be one of {list(TRAIN_CHOICES)}, got {train!r}")
        if compressed_lr is not None and not (isinstance(compressed_lr, (int, float)) and compressed_lr > 0):
            raise ValueError(f"compressed_lr must be a number > 0 or None (scaled to the centroids), "
                             f"got {compressed_lr!r}")
        if hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {list(HIDDEN_LOSSES)}, got {hidden_loss!r}")
        if not (isinstance(row_weight, (int, float)) and row_weight >= 0):
            raise ValueError(f"row_weight must be a number >= 0, got {row_weight!r}")
        if distill_on == "logits" and (teacher_model.get_output_embeddings() is None
                                       or model.get_output_embeddings() is None):
            raise ValueError('distill_on="logits" needs models with an output layer (get_output_embeddings()); '
                             'for an encoder use distill_on="last_hidden_state"')
        if distill_on == "logits":
            v_t = teacher_model.get_output_embeddings().weight.shape[0]
            v_s = _vocab_size(model.get_output_embeddings())
            if v_t != v_s:
                raise ValueError(f"teacher and student vocabularies differ ({v_t} vs {v_s} words): the logits KL "
                                 "needs the same tokenizer")
        compressed = _compressed_parameters(model)
        if train == "compressed" and not compressed:
            raise ValueError('train="compressed" but the model has no trainable compressed layer (a basis '
                             'embedding or head; quant layers are frozen): use train="all"')
        self.distill_on, self.temperature, self.alpha = distill_on, float(temperature), float(alpha)
        self.train_what, self.row_weight = train, float(row_weight)
        self.hidden_loss = hidden_loss
        self.dropout = bool(dropout)
        if train == "compressed":
            keep = {id(p) for p in compressed}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
        self._compressed_ids = {id(p) for p in compressed}
        super().__init__(model=model, args=args, **kwargs)
        teacher_model.eval().requires_grad_(False)
        self.teacher = teacher_model.to(self.args.device)
        emb = model.get_input_embeddings()
        self._row_target = None
        if isinstance(emb, BasisEmbedding):
            teacher_rows = teacher_model.get_input_embeddings().weight.detach()
            if teacher_rows.shape != (emb.num_embeddings, emb.embedding_dim):
                raise ValueError(f"teacher embedding is {tuple(teacher_rows.shape)}, the student's "
                                 f"{(emb.num_embeddings, emb.embedding_dim)}: distillation needs the same table")
            if refit_codes and self.train_dataset is not None:
                counts = token_counts(self.train_dataset, emb.num_embeddings)
                self.refit_error = refit_embedding_codes(emb, teacher_rows, counts, seed=self.args.seed)
            if row_weight > 0:
                self._row_target = teacher_rows
                self._row_scale = float(teacher_rows.float().pow(2).sum(-1).mean())
        if compressed_lr is None:  # scaled to the centroids the optimizer will move (after any re-fit)
            centroids = [p for p in compressed if p.dim() == 3] or compressed
            rms = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in centroids)
                            / max(1, sum(p.numel() for p in centroids)))
            compressed_lr = DEFAULT_RELATIVE_LR * rms if rms > 0 else 1e-3
        self.compressed_lr = float(compressed_lr)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (class and settings from `args`) with the compressed layers in their own
        parameter group at `compressed_lr` and no weight decay."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for _, p in named if id(p) in self._compressed_ids], "lr": self.compressed_lr,
                 "weight_decay": 0.0},
                {"params": [p for n, p in named if id(p) not in self._compressed_ids and n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if id(p) not in self._compressed_ids and n not in decay],
                 "weight_decay": 0.0},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        mask = inputs.get("attention_mask")
        student = self.accelerator.unwrap_model(model)
        if not self.dropout and student.training:
            student.eval()  # the Trainer calls model.train() before every step; reset by the next one
        with torch.no_grad():
            teacher_hidden = self._hidden(self.teacher, self.teacher, inputs)
        hidden = self._hidden(model, student, inputs)
        mask = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
        if self.distill_on == "last_hidden_state":
            loss = hidden.new_zeros((), dtype=torch.float32)
            if self.hidden_loss in ("pooled_cosine", "pooled_and_token_cosine"):
                loss = loss + 1 - F.cosine_similarity(_mean_pool(hidden.float(), mask),
                                                      _mean_pool(teacher_hidden.float(), mask), dim=-1).mean()
            if self.hidden_loss in ("token_cosine", "pooled_and_token_cosine"):
                token = 1 - F.cosine_similarity(hidden.float(), teacher_hidden.float(), dim=-1)
                loss = loss + (token * mask).sum() / mask.sum().clamp_min(1)
        else:
            loss = self.alpha * self._logits_kl(student, hidden, teacher_hidden, mask)
            if self.alpha < 1:
                if labels is None:
                    raise ValueError("alpha < 1 mixes in the label loss, but the batch has no labels")
                loss = loss + (1 - self.alpha) * self._label_loss(student, hidden, labels)
        if self._row_target is not None:
            emb = student.get_input_embeddings()
            ids = inputs["input_ids"][mask] if mask is not None else inputs["input_ids"].reshape(-1)
            target = self._row_target.to(ids.device)[ids]
            loss = loss + self.row_weight * (emb(ids).float() - target.float()).pow(2).sum(-1).mean() / self._row_scale
        return (loss, {"loss": loss}) if return_outputs else loss

    def _hidden(self, model: nn.Module, unwrapped: nn.Module, inputs: dict) -> torch.Tensor:
        """(batch, seq, H): the input of the output layer ("logits", and LMs under "last_hidden_state") or the
        encoder's last_hidden_state."""
        head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
        if head is None:
            return model(**inputs).last_hidden_state
        return _head_input(model, head, inputs)

    def _logits_kl(self, student, hidden, teacher_hidden, mask):
        head, teacher_head = student.get_output_embeddings(), self.teacher.get_output_embeddings()
        tau = self.temperature
        h, th, m = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), \
            mask.reshape(-1)
        if isinstance(head, BasisLinear):
            return basis_kl_divergence(h, head.codebook.centroids, head.codebook.codes, head.bias, th,
                                       teacher_head.weight, teacher_head.bias, m, tau)
        return _dense_logits_kl(h, head, th, teacher_head, m, tau) / m.sum().clamp_min(1)

    def _label_loss(self, student, hidden, labels):
        """Cross-entropy against `labels`, shifted for a causal LM (as its loss function does)."""
        if type(student).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        head = student.get_output_embeddings()
        if isinstance(head, BasisLinear):
            return basis_cross_entropy(hidden, head.codebook.centroids, head.codebook.codes, head.bias, labels)
        logits = head(hidden).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _vocab_size(head: nn.Module) -> int:
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
