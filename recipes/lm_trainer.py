"""Trainer pieces for the language-modelling recipes.

- `LMTrainer`: the HF Trainer, counting the tokens it trains on (for tokens/s), with optional centroid param groups
  and optional knowledge distillation from a frozen dense teacher (training steps only; evaluation stays the label
  perplexity).
- `SGDWithAdamGroups`: SGD, except for the param groups marked `adam` (the basis layers' parameters), which take
  Adam steps decaying linearly to 0.
- `BPTTTrainer`: truncated BPTT for a stateful model (the LSTM LM) with the Trainer's own loop, logging, progress
  bars, evaluation and checkpointing. Batches come from `BPTTBatches` in stream order through a plain DataLoader (no
  shuffling, no re-batching, no sharding by accelerate: under DDP each process already holds its own columns), and
  the recurrent state returned by one window is detached and fed to the next (a teacher's state likewise).
- `token_nll` / `PerplexityMetric`: exact corpus perplexity exp(total NLL / total tokens) from the evaluation loop,
  computed by the `evaluate` module shipped in hf_basis (the Trainer's eval_loss is a mean of batch means).
- `StopOnInterrupt`: Ctrl-C finishes the current step and ends training normally (then the recipe evaluates and
  saves); a second Ctrl-C aborts.
"""

from __future__ import annotations

import math
import signal
import sys

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

import hf_basis.metrics
from hf_basis import BasisEmbedding, BasisLinear, Codebook
from hf_basis.integrations.distillation import logits_distillation_loss
from hf_basis.models.lstm import STATE_FIELD

__all__ = [
    "BPTTTrainer",
    "LMTrainer",
    "PerplexityMetric",
    "SGDWithAdamGroups",
    "StopOnInterrupt",
    "basis_optimizer_error",
    "distillation_error",
    "layer_parameters",
    "token_nll",
]

IGNORE_INDEX = -100


class SGDWithAdamGroups(torch.optim.Optimizer):
    """torch.optim.SGD (lr, momentum, weight_decay; no dampening or Nesterov) for every param group, except the
    groups with `"adam": True`, which take bias-corrected Adam steps (lr, betas, eps, weight_decay as torch.optim.Adam)
    whose size decays linearly to 0 over the group's `decay_steps` optimizer steps when that is set.

    One optimizer, so the Trainer's LR scheduler scales every group's lr and its state_dict (checkpoints) holds both
    kinds of state. The recipes use it to train the basis layers with Adam while the LSTM keeps the SGD schedule it
    was trained with (PTB numbers in recipes/results/README.md).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid hyper-parameters: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"betas={betas}, eps={eps} (all >= 0, betas in [0, 1))")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "betas": betas, "eps": eps,
                    "adam": False, "decay_steps": None}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if not group["weight_decay"] else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if group["adam"]:
                    self._adam_step(p, grad, state, group)
                    continue
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(grad)
                    grad = buf
                p.add_(grad, alpha=-group["lr"])
        return loss

    @staticmethod
    def _adam_step(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]
        lr = group["lr"]
        if group["decay_steps"]:
            lr *= max(0.0, 1.0 - step / group["decay_steps"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


BASIS_OPTIMIZERS = ("same", "adam")


def basis_optimizer_error(basis_optimizer: str, basis_learning_rate: float | None,
                          centroid_learning_rate: float | None, optim: str) -> str | None:
    """Why these basis-optimizer settings are invalid (the recipe's parser and LMTrainer both ask), or None."""
    if basis_optimizer not in BASIS_OPTIMIZERS:
        return f"basis_optimizer must be one of {list(BASIS_OPTIMIZERS)}, got {basis_optimizer!r}"
    if basis_optimizer == "adam" and (basis_learning_rate is None or centroid_learning_rate is not None
                                      or optim != "sgd"):
        return ("basis_optimizer='adam' needs basis_learning_rate (Adam's step size, e.g. 1e-2), optim='sgd' and no "
                f"centroid_learning_rate (got {basis_learning_rate}, {optim!r}, {centroid_learning_rate})")
    if basis_learning_rate is not None and basis_optimizer != "adam":
        return "basis_learning_rate is the step size of basis_optimizer='adam'"
    return None


def distillation_error(alpha: float, temperature: float) -> str | None:
    """Why these distillation settings are invalid (the recipe's parser and LMTrainer both ask), or None."""
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        return f"distill_alpha must be in [0, 1] (the weight of the KL; 1 - it weighs the label loss), got {alpha}"
    if not (math.isfinite(temperature) and temperature > 0):
        return f"distill_temperature must be a finite number > 0, got {temperature}"
    return None


LAYERS = ("input", "output")


def layer_parameters(model: torch.nn.Module, layers: tuple[str, ...] | None = None) -> list[torch.nn.Parameter]:
    """The trainable parameters of the model's input embedding ("input") and/or output layer ("output"), whatever
    they are: codebook centroids and bias of basis layers, weight and bias of dense ones (none for the frozen quant
    layers). None: those of the two that are basis layers. Shared tensors (tied layers, a codebook) once each."""
    getters = {"input": model.get_input_embeddings, "output": model.get_output_embeddings}
    if layers is None:
        layers = tuple(name for name, get in getters.items() if isinstance(get(), (BasisEmbedding, BasisLinear)))
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise ValueError(f"layers must be a subset of {LAYERS}, got {sorted(unknown)}")
    params = [p for name in layers if getters[name]() is not None for p in getters[name]().parameters()]
    return [p for p in dict.fromkeys(params) if p.requires_grad]


class LMTrainer(Trainer):
    """Trainer that counts the input tokens of its training steps in `train_tokens` (this process only).

    Args:
        centroid_learning_rate: if set, the centroids of hf_basis codebooks get their own param group with this
            learning rate (schedulers scale it like the others). A centroid's gradient is the sum of the gradients
            of every word that shares it, so plain SGD moves a decoded row much further than a dense row.
        basis_optimizer: "same" (every parameter uses the Trainer's optimizer) or "adam" (with `optim="sgd"` only):
            one `SGDWithAdamGroups` in which the parameters of the layers in `adam_layers` (`layer_parameters`:
            the basis layers' centroids and bias, or a dense layer's weight and bias, so a dense model can get the
            same treatment as a converted one) take Adam steps of `basis_learning_rate`, decayed linearly to 0 over
            the training steps, and the rest SGD steps.
        basis_learning_rate: Adam's step size for basis_optimizer="adam".
        adam_layers: which of ("input", "output") take the Adam steps (default: those that are basis layers).
        teacher: a dense causal LM with the same tokenizer to distill from (None: plain training). Frozen: eval mode,
            no gradients, moved to the training device, run under no_grad in training steps only. Each training
            step's loss is then distill_alpha * tau^2 KL(teacher || student) + (1 - distill_alpha) * the model's own
            label loss, over the tokens that have a label (`logits_distillation_loss`: fused for a basis output
            layer). The two terms are logged as `distill_kl` and `label_loss` (means over the logging interval).
        distill_alpha: weight of the KL, in [0, 1].
        distill_temperature: tau > 0 of the KL.
    """

    def __init__(self, *args, centroid_learning_rate: float | None = None, basis_optimizer: str = "same",
                 basis_learning_rate: float | None = None, adam_layers: tuple[str, ...] | None = None,
                 teacher: torch.nn.Module | None = None, distill_alpha: float = 0.5, distill_temperature: float = 1.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        error = (basis_optimizer_error(basis_optimizer, basis_learning_rate, centroid_learning_rate, self.args.optim)
                 or distillation_error(distill_alpha, distill_temperature))
        if error:
            raise ValueError(error)
        if teacher is not None and not isinstance(teacher.get_output_embeddings(), torch.nn.Linear):
            raise ValueError(f"teacher must be a dense model (an nn.Linear output layer), got "
                             f"{type(teacher.get_output_embeddings()).__name__}")
        self.train_tokens = 0
        self.centroid_learning_rate = centroid_learning_rate
        self.basis_optimizer = basis_optimizer
        self.basis_learning_rate = basis_learning_rate
        self.adam_layers = None if adam_layers is None else tuple(adam_layers)
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False).to(self.args.device)
        self.distill_alpha, self.distill_temperature = float(distill_alpha), float(distill_temperature)
        self._distill_sums: dict[str, torch.Tensor] = {}  # loss terms summed since the last log, and their count

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        model = self.model if model is None else model
        if self.centroid_learning_rate is not None:
            centroids = {id(m.centroids) for m in model.modules() if isinstance(m, Codebook)}
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in centroids]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in centroids]
                    optimizer.add_param_group(
                        {**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                         "lr": self.centroid_learning_rate}
                    )
        if self.basis_optimizer == "adam":
            if any(g["dampening"] or g["nesterov"] for g in optimizer.param_groups):
                raise ValueError("basis_optimizer='adam' supports SGD without dampening or Nesterov momentum")
            adam = layer_parameters(model, self.adam_layers)
            adam_ids = {id(p) for p in adam}
            groups = [{"params": [p for p in g["params"] if id(p) not in adam_ids], "lr": g["lr"],
                       "momentum": g["momentum"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            groups.append({"params": adam, "lr": self.basis_learning_rate, "adam": True, "weight_decay": 0.0})
            self.optimizer = optimizer = SGDWithAdamGroups([g for g in groups if g["params"]],
                                                           lr=self.args.learning_rate)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler; the Adam groups of a `SGDWithAdamGroups` also decay to 0 over these steps."""
        optimizer = self.optimizer if optimizer is None else optimizer
        for group in optimizer.param_groups:  # the optimizer may arrive wrapped by accelerate: its groups are ours
            if group.get("adam"):
                group["decay_steps"] = num_training_steps
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.train_tokens += inputs["input_ids"].numel()
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        teacher_hidden = self._teacher_hidden(inputs)
        label_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                   num_items_in_batch=num_items_in_batch)
        kl = self._distillation_kl(outputs.logits, teacher_hidden, inputs, num_items_in_batch)
        loss = self.distill_alpha * kl + (1 - self.distill_alpha) * label_loss
        for name, value in (("distill_kl", kl), ("label_loss", label_loss), ("count", torch.ones_like(kl))):
            self._distill_sums[name] = self._distill_sums.get(name, 0) + value.detach().float()
        return (loss, outputs) if return_outputs else loss

    def _distillation_kl(self, logits, teacher_hidden, inputs, num_items_in_batch) -> torch.Tensor:
        """tau^2 KL(teacher || student) over the positions that have a label, normalised like the label loss that
        Trainer.compute_loss returns: a mean over this batch, or, when the model normalises by the Trainer's
        num_items_in_batch (gradient accumulation / token averaging across processes), a sum divided by it and
        multiplied by the processes' count as the Trainer does."""
        targets = inputs.get("shift_labels")
        if targets is None:  # causal-LM labels: position t is trained on labels[t + 1]
            targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
        mask = targets != IGNORE_INDEX
        head = self.teacher.get_output_embeddings()
        tau = self.distill_temperature
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return logits_distillation_loss(logits, teacher_hidden, head, mask, tau, reduction="mean")
        kl = logits_distillation_loss(logits, teacher_hidden, head, mask, tau, reduction="sum")
        kl = kl / torch.as_tensor(num_items_in_batch, device=kl.device)
        if self.args.average_tokens_across_devices:
            kl = kl * self.accelerator.num_processes
        return kl

    def _teacher_hidden(self, inputs: dict) -> torch.Tensor:
        """The teacher's output-layer input for this batch (a stateless model: input_ids and attention_mask)."""
        hidden, _ = self._teacher_forward({k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs})
        return hidden

    @torch.no_grad()
    def _teacher_forward(self, inputs: dict):
        """(the activations entering the teacher's output layer, the teacher's outputs). A pre-hook captures the
        layer's input and hands the layer zero positions instead, so the forward runs to its end (a stateful model
        still returns its state) without building the teacher's logits: `logits_distillation_loss` computes them
        from the hidden states, chunk by chunk for a basis student."""
        captured = []

        def hook(module, args):
            captured.append(args[0])
            return (args[0][..., :0, :], *args[1:])

        handle = self.teacher.get_output_embeddings().register_forward_pre_hook(hook)
        try:
            outputs = self.teacher(**inputs)
        finally:
            handle.remove()
        return captured[0], outputs

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs also carry the distillation's two loss terms (this process's means since the last log)."""
        if "loss" in logs and self._distill_sums:
            count = self._distill_sums.pop("count")
            logs.update({name: round(float(total / count), 4) for name, total in self._distill_sums.items()})
            self._distill_sums = {}
        super().log(logs, *args, **kwargs)


class BPTTTrainer(LMTrainer):
    """Truncated BPTT: items of a `BPTTBatches` dataset are whole batches, read in order, and the model's recurrent
    state is carried from one to the next (detached), separately for training and for evaluation passes. An item with
    `reset_state=True` (the first of each pass: every epoch, every evaluation) starts from a zero state.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._states: dict[str, object] = {}
        self._teacher_state = None  # the teacher runs in training steps only, so it has a training state only

    def _ordered_loader(self, dataset) -> DataLoader:
        # batch_size=None: each item already is a batch. Not passed through accelerator.prepare, which would shard
        # batches across processes; this process's dataset holds only its own streams.
        return DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("BPTTTrainer needs a train_dataset")
        return self._ordered_loader(self.train_dataset)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        if eval_dataset is None:
            raise ValueError("BPTTTrainer needs an eval_dataset")
        return self._ordered_loader(eval_dataset)

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._ordered_loader(test_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        key = "train" if model.training else "eval"
        reset = bool(inputs.pop("reset_state", False))
        state = None if reset else self._states.get(key)
        if state is not None and state.batch_size != inputs["input_ids"].shape[0]:
            state = None
        inputs = {**inputs, "past_key_values": state, "use_cache": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._states[key] = outputs[STATE_FIELD].detach()
        return (loss, outputs) if return_outputs else loss

    def _teacher_hidden(self, inputs: dict) -> torch.Tensor:
        """The teacher reads the same streams as the student with its own state, carried from window to window and
        started from zeros exactly where the student's is (the student got no state: a new pass, or a new batch
        size). Evaluations do not run the teacher, so they leave its training state where it was."""
        state = None if inputs["past_key_values"] is None else self._teacher_state
        hidden, outputs = self._teacher_forward({"input_ids": inputs["input_ids"], "past_key_values": state,
                                                 "use_cache": True})
        self._teacher_state = outputs[STATE_FIELD]
        return hidden


def token_nll(logits: torch.Tensor | tuple, labels: torch.Tensor | tuple) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: per-token NLL (B, T) float32, so that evaluation keeps B x T numbers instead
    of B x T x V logits. `labels` is (labels, shift_labels) with label_names=["labels", "shift_labels"]."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if isinstance(labels, (tuple, list)):
        targets = labels[-1]
    else:  # plain causal-LM labels: shift them here, as the loss does
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    nll = F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    )
    return nll.view(targets.shape)


class PerplexityMetric:
    """`compute_metrics` for the Trainer: corpus perplexity of the per-token NLLs from `token_nll`.

    The Trainer concatenates batches of different lengths by padding with -100, so the targets decide which entries
    are tokens. Returns {"perplexity", "nll", "num_tokens"} (the Trainer prefixes them, e.g. eval_perplexity).
    """

    def __init__(self) -> None:
        self.metric = evaluate.load(hf_basis.metrics.PERPLEXITY)

    def __call__(self, eval_pred) -> dict[str, float]:
        nll = np.asarray(eval_pred.predictions, dtype=np.float64)
        labels = eval_pred.label_ids
        targets = np.asarray(labels[-1] if isinstance(labels, (tuple, list)) else labels)
        if not isinstance(labels, (tuple, list)):
            targets = np.pad(targets, [(0, 0)] * (targets.ndim - 1) + [(0, 1)], constant_values=IGNORE_INDEX)[..., 1:]
        mask = targets != IGNORE_INDEX
        nll = nll.reshape(mask.shape[0], -1)
        mask = mask.reshape(mask.shape[0], -1)
        result = self.metric.compute(nll=np.where(mask, nll, 0.0).sum(axis=1), num_tokens=mask.sum(axis=1))
        return {"perplexity": result["perplexity"], "nll": result["loss"], "num_tokens": result["num_tokens"]}


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) ends training at the end of the current optimizer step, through the Trainer's own stop flag,
    so the recipe can still evaluate and save. A second Ctrl-C raises KeyboardInterrupt at once. Under DDP every
    process stops at the same step (the flag is all-reduced)."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupted = False
        self.phase = "training"  # the recipe names each phase ("dense", "basis" ...) for the log line below
        self._previous = None

    def install(self) -> "StopOnInterrupt":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        print("\n[hf_basis] Ctrl-C: stopping after this step, then evaluating and saving (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def _any_process_requested(self, args) -> bool:
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(self.requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.requested

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"[hf_basis] {self.phase}: training started ({state.max_steps} steps)", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_process_requested(args):
            self.interrupted = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = False
        return control
