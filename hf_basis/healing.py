"""Heal a converted model end to end: load the dense teacher (and convert it, or load a compressed student), measure,
distill with `DistillationTrainer`, measure again, save the healed checkpoint, its model card and results.json.

Used by `recipes/heal.py` and `hf-basis heal`. Data: the first `max_sentences` non-empty lines of DIR/ptb.train.txt
(or DIR/train.txt) with `data_dir`, or the `text` column of a datasets dataset's train split with `dataset`;
evaluation on the first `eval_sentences` lines of the test file / split. Encoders (no output layer) are distilled on
`last_hidden_state` and measured by the mean cosine of their sentence embeddings (mean pooling + normalisation, as
sentence-transformers does) against the teacher's; language models on `logits`, measured by test perplexity.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from hf_basis.convert import convert
from hf_basis.integrations.distillation import DistillationTrainer
from hf_basis.integrations.model_card import SECTION_END
from hf_basis.loading import load_model
from hf_basis.report import report

__all__ = ["HealArguments", "heal"]


@dataclass
class HealArguments:
    teacher: str = field(default=None, metadata={"help": "dense checkpoint folder (the model to reproduce)"})
    student: str | None = field(default=None, metadata={"help": "hf_basis checkpoint to heal (else: convert here)"})
    method: str = field(default="basis", metadata={"help": "basis or quant (when converting here)"})
    num_basis: int = 8
    num_clusters: int = 256
    nbit: int = 4
    modules: str = field(default="both", metadata={"help": "both, input or output (when converting here)"})
    data_dir: str | None = field(default=None, metadata={"help": "folder with ptb.{train,test}.txt or {train,test}.txt"})
    dataset: str | None = field(default=None, metadata={"help": "datasets name with a `text` column"})
    dataset_config: str | None = None
    max_sentences: int = field(default=20000, metadata={"help": "training sentences (lines) at most"})
    eval_sentences: int = field(default=256, metadata={"help": "test sentences for the before / after metric"})
    max_length: int = 128
    distill_on: str | None = field(default=None, metadata={"help": "logits or last_hidden_state (default: by model)"})
    temperature: float = 1.0
    alpha: float = 1.0
    train: str = field(default="compressed", metadata={"help": "compressed (default) or all"})
    compressed_lr: float | None = field(default=None, metadata={"help": "default: 0.05 x the centroids' RMS"})
    hidden_loss: str = field(default="pooled_cosine", metadata={
        "help": "pooled_cosine, token_cosine or pooled_and_token_cosine (their sum); encoders only"})
    refit_codes: bool = True

    def check(self) -> None:
        """One-line errors naming the argument, before anything is loaded."""
        if not self.teacher:
            raise ValueError("teacher (the dense checkpoint folder) is required")
        if (self.data_dir is None) == (self.dataset is None):
            raise ValueError("give exactly one of data_dir or dataset")
        if self.distill_on not in (None, "logits", "last_hidden_state"):
            raise ValueError(f"distill_on must be logits or last_hidden_state, got {self.distill_on!r}")
        if self.max_sentences < 1 or self.eval_sentences < 1:
            raise ValueError("max_sentences and eval_sentences must be >= 1")


def _load_model(path: str):
    """The class the checkpoint's config names (an hf_basis checkpoint loads compressed), else AutoModel."""
    return load_model(path, transformers.AutoConfig.from_pretrained(path), dtype=torch.float32)


def _lines(path: str, limit: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(line.strip())
                if len(out) >= limit:
                    break
    return out


def load_texts(heal: HealArguments) -> tuple[list[str], list[str]]:
    """(train sentences, test sentences)."""
    if heal.data_dir is not None:
        def pick(split):
            for name in (f"ptb.{split}.txt", f"{split}.txt"):
                if os.path.exists(os.path.join(heal.data_dir, name)):
                    return os.path.join(heal.data_dir, name)
            raise FileNotFoundError(f"{heal.data_dir} has neither ptb.{split}.txt nor {split}.txt")

        return _lines(pick("train"), heal.max_sentences), _lines(pick("test"), heal.eval_sentences)
    import datasets

    ds = datasets.load_dataset(heal.dataset, heal.dataset_config)
    texts = {split: [t.strip() for t in ds[split]["text"] if t.strip()] for split in ("train", "test")}
    return texts["train"][: heal.max_sentences], texts["test"][: heal.eval_sentences]


def _batches(tokenizer, texts, max_length, size=64):
    for i in range(0, len(texts), size):
        yield tokenizer(texts[i: i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts, max_length) -> torch.Tensor:
    """Mean pooling over the non-padded tokens + L2 normalisation (sentence-transformers' recipe)."""
    model.eval()
    out = []
    for batch in _batches(tokenizer, texts, max_length):
        batch = batch.to(model.device)
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def perplexity(model, tokenizer, texts, max_length) -> float:
    """Token-level perplexity of a causal LM on the sentences (each scored on its own, padding ignored)."""
    model.eval()
    nll, count = 0.0, 0
    for batch in _batches(tokenizer, texts, max_length):
        batch = batch.to(model.device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += int((target != -100).sum())
    return math.exp(nll / max(count, 1))


def evaluate(student, teacher, tokenizer, texts, heal, teacher_reference=None) -> dict:
    if heal.distill_on == "last_hidden_state":
        ref = teacher_reference if teacher_reference is not None else sentence_embeddings(teacher, tokenizer, texts,
                                                                                          heal.max_length)
        emb = sentence_embeddings(student, tokenizer, texts, heal.max_length)
        return {"sentence_cosine": float((emb * ref).sum(-1).mean())}
    return {"perplexity": perplexity(student, tokenizer, texts, heal.max_length)}


def heal(heal: HealArguments, training: TrainingArguments, command: str = "") -> dict:
    """Load (and convert), measure, distill, measure again, save to training.output_dir; returns results.json's dict."""
    heal.check()
    transformers.set_seed(training.seed)
    tokenizer = AutoTokenizer.from_pretrained(heal.teacher)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # On the training device from the start: the conversion's k-means and the measurements before healing run there.
    teacher = _load_model(heal.teacher).to(training.device).eval()
    if heal.student is not None:
        student = _load_model(heal.student).to(training.device)
    else:
        student = _load_model(heal.teacher).to(training.device)
        settings = ({"num_basis": heal.num_basis, "num_clusters": heal.num_clusters} if heal.method == "basis"
                    else {"nbit": heal.nbit})
        convert(student, method=heal.method, modules=heal.modules, seed=training.seed, **settings)
    if heal.distill_on is None:
        heal.distill_on = "logits" if teacher.get_output_embeddings() is not None else "last_hidden_state"
    train_texts, test_texts = load_texts(heal)

    before_teacher = None
    if heal.distill_on == "last_hidden_state":
        before_teacher = sentence_embeddings(teacher, tokenizer, test_texts, heal.max_length)
        teacher_metric = {"sentence_cosine": 1.0}
    else:
        teacher_metric = {"perplexity": perplexity(teacher, tokenizer, test_texts, heal.max_length)}
    before = evaluate(student, teacher, tokenizer, test_texts, heal, before_teacher)
    print(f"teacher {teacher_metric}, student before healing {before}", flush=True)

    encoded = tokenizer(train_texts, truncation=True, max_length=heal.max_length)
    train_dataset = [{"input_ids": ids, "attention_mask": mask} for ids, mask in
                     zip(encoded["input_ids"], encoded["attention_mask"])]
    if heal.alpha < 1:
        for example in train_dataset:
            example["labels"] = list(example["input_ids"])
    collate = DataCollatorWithPadding(tokenizer)

    def collator(features):
        labels = [f.pop("labels") for f in features] if "labels" in features[0] else None
        batch = collate(features)
        if labels is not None:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    start = time.time()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training, train_dataset=train_dataset, data_collator=collator,
        distill_on=heal.distill_on, temperature=heal.temperature, alpha=heal.alpha, train=heal.train,
        compressed_lr=heal.compressed_lr, hidden_loss=heal.hidden_loss, refit_codes=heal.refit_codes,
    )  # fmt: skip
    refit = evaluate(student, teacher, tokenizer, test_texts, heal, before_teacher) if heal.refit_codes else None
    trainer.train()
    seconds = time.time() - start
    after = evaluate(student, teacher, tokenizer, test_texts, heal, before_teacher)
    print(f"after healing {after} ({seconds:.0f} s)", flush=True)

    rep = report(student)
    results = {
        "teacher": heal.teacher, "student": heal.student or "converted here",
        "compression": student.hf_basis_config, "compression_ratio": rep.compression_ratio,
        "bytes_before": rep.bytes_before, "bytes_after": rep.bytes_after,
        "teacher_metric": teacher_metric, "before_healing": before, "after_code_refit": refit,
        "after_healing": after, "train_sentences": len(train_texts),
        # tokens the healing read: the training sentences' (truncated) tokens once per epoch trained
        "train_tokens": round(sum(map(len, encoded["input_ids"])) * (trainer.state.epoch or 0)),
        "eval_sentences": len(test_texts), "train_seconds": round(seconds, 1), "compressed_lr": trainer.compressed_lr,
        "device": torch.cuda.get_device_name(training.device) if training.device.type == "cuda" else "cpu",
        "heal_args": asdict(heal), "command": command,
    }  # fmt: skip
    os.makedirs(training.output_dir, exist_ok=True)
    student.save_pretrained(training.output_dir)
    tokenizer.save_pretrained(training.output_dir)
    _add_metrics_to_card(os.path.join(training.output_dir, "README.md"), results)
    with open(os.path.join(training.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    return results


def _add_metrics_to_card(path: str, results: dict) -> None:
    """Append a "Healing" table (metrics of the teacher, the student before and after) after the hf_basis section
    of the card save_pretrained wrote."""
    if not os.path.exists(path):
        return
    rows = [("teacher (dense)", results["teacher_metric"]), ("converted, before healing", results["before_healing"])]
    if results["after_code_refit"] is not None:
        rows.append(("after re-fitting the codes", results["after_code_refit"]))
    rows.append(("healed", results["after_healing"]))
    (metric,) = results["after_healing"]
    table = "\n".join(f"| {name} | {values[metric]:.4f} |" for name, values in rows)
    section = (f"\n\n## Healing (distilled from the dense model)\n\n{results['train_sentences']} training sentences, "
               f"{results['eval_sentences']} test sentences.\n\n| model | {metric} |\n|---|---|\n{table}\n")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = text.replace(SECTION_END, SECTION_END + section, 1) if SECTION_END in text else text + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)

