"""Word-level language-modelling data for the recipes: corpora, tokenizer, token streams and their batch layouts.

    raw = load_corpus("ptb", data_dir="../shared/data/ptb")        # DatasetDict(train/validation/test), column "text"
    tokenizer = build_tokenizer(raw["train"]["text"])              # WordLevel, "<unk>" = 0, "<eos>" = 1
    ids = tokenize(raw, tokenizer)                                 # "<eos>" after each line; cached by datasets
    stream = token_stream(ids["train"])                            # (N,) int64, the whole split as one stream
    BPTTBatches(stream, batch_size=20, bptt=35)                    # stateful layout (PyTorch's word_language_model)
    BlockDataset(stream, block_size=128)                           # independent blocks (shuffled by the Trainer)

Both layouts give every token of the stream (after the first) exactly one prediction: a window's inputs are
stream[i : i + T] and its targets stream[i + 1 : i + T + 1], passed as `shift_labels` (transformers' name for labels
that are already aligned with the logits). `labels` is the window itself, as for any causal LM.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from datasets import DatasetDict, load_dataset
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

__all__ = [
    "CORPORA",
    "BPTTBatches",
    "BlockDataset",
    "Corpus",
    "CorpusNotFound",
    "build_tokenizer",
    "load_corpus",
    "token_stream",
    "tokenize",
]

UNK, EOS = "<unk>", "<eos>"
SPLITS = ("train", "validation", "test")


class CorpusNotFound(FileNotFoundError):
    """The corpus can be read neither from the Hub nor from --data_dir; the message says how to point at files."""


@dataclass(frozen=True)
class Corpus:
    """Where a corpus lives on the Hub and how its canonical files are named."""

    hub_id: str
    hub_config: str | None  # the config's name (its folder on the `refs/convert/parquet` branch, which has no card)
    hub_revision: str | None
    text_column: str
    file_pattern: str  # with "{split}" in train / valid / test

    def files(self, data_dir: str) -> dict[str, str]:
        names = {"train": "train", "validation": "valid", "test": "test"}
        return {split: os.path.join(data_dir, self.file_pattern.format(split=names[split])) for split in SPLITS}


# Hub ids (the defaults; the project's machines cannot reach the Hub, so tests and CI use --data_dir):
# - PTB: the Hub copy's main branch is a loading script, which datasets >= 4 refuses; its auto-converted parquet
#   branch `refs/convert/parquet` holds the same sentences (column "sentence") as penn_treebank/{split}/0000.parquet,
#   with no dataset card naming the config, so the config is read as a folder (data_dir), not by name.
# - WikiText: Salesforce/wikitext, parquet, column "text" (one line per row, blank lines included).
CORPORA: dict[str, Corpus] = {
    "ptb": Corpus(
        "ptb-text-only/ptb_text_only", "penn_treebank", "refs/convert/parquet", "sentence", "ptb.{split}.txt"
    ),
    "wikitext-2": Corpus("Salesforce/wikitext", "wikitext-2-v1", None, "text", "wiki.{split}.tokens"),
    "wikitext-2-raw": Corpus("Salesforce/wikitext", "wikitext-2-raw-v1", None, "text", "wiki.{split}.raw"),
    "wikitext-103": Corpus("Salesforce/wikitext", "wikitext-103-v1", None, "text", "wiki.{split}.tokens"),
    "wikitext-103-raw": Corpus("Salesforce/wikitext", "wikitext-103-raw-v1", None, "text", "wiki.{split}.raw"),
}


def load_corpus(name: str, data_dir: str | None = None, cache_dir: str | None = None) -> DatasetDict:
    """The train / validation / test splits of a corpus, one line of text per row in column "text".

    Args:
        name: a key of CORPORA ("ptb", "wikitext-2", "wikitext-2-raw", "wikitext-103", "wikitext-103-raw").
        data_dir: a folder holding the canonical files (ptb.{train,valid,test}.txt or wiki.{train,valid,test}.tokens,
            .raw for the raw WikiText variants); None loads the Hub copy.
        cache_dir: datasets' cache folder (None: datasets' default, ~/.cache/huggingface/datasets).
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    corpus = CORPORA[name]
    canonical = ", ".join(os.path.basename(p) for p in corpus.files(".").values())
    if data_dir is None:
        try:
            parquet_export = corpus.hub_revision == "refs/convert/parquet"
            raw = load_dataset(
                corpus.hub_id, None if parquet_export else corpus.hub_config,
                data_dir=corpus.hub_config if parquet_export else None, revision=corpus.hub_revision,
                cache_dir=cache_dir,
            )  # fmt: skip
        except OSError as err:  # ConnectionError (offline, unreachable), DatasetNotFoundError, ...
            raise CorpusNotFound(
                f"could not load {name} from the Hugging Face Hub ({corpus.hub_id}: {' '.join(str(err).split())}); "
                f"to train from local files, pass the folder holding {canonical} as --data_dir DIR "
                f'(make train ARGS="--data_dir DIR")'
            ) from err
        if corpus.text_column != "text":
            raw = raw.rename_column(corpus.text_column, "text")
        return DatasetDict({split: raw[split].select_columns(["text"]) for split in SPLITS})
    files = corpus.files(data_dir)
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise CorpusNotFound(
            f"--data_dir {data_dir} must hold the canonical {name} files ({canonical}); missing: {', '.join(missing)}"
        )
    return load_dataset("text", data_files=files, cache_dir=cache_dir)


def _word_level(vocab: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(vocab)}, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    # No post-processor: a prompt encodes to its words only (an appended <eos> would make generate() continue after
    # an end of sentence); `tokenize` appends <eos> to every line of the training data.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=EOS)


def build_tokenizer(
    train_texts: Iterable[str] | None = None, *, vocab_file: str | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: whitespace split, unknown words -> `<unk>`; `tokenizer(text)` adds no `<eos>`.

    The vocabulary is either every word of `train_texts` (ids: `<unk>` = 0, `<eos>` = 1, then by decreasing count,
    ties by first appearance; deterministic, so cached tokenisations stay valid) or the words of `vocab_file`, one per
    line in id order (the first whitespace-separated field of each line; further fields such as counts are ignored;
    `<unk>` / `<eos>` are appended if the file lacks them). Save it with `save_pretrained` beside the model.
    The training data's lines end in `<eos>` (`tokenize` appends it); a prompt encodes to its words only.
    """
    if (train_texts is None) == (vocab_file is None):
        raise ValueError("pass exactly one of train_texts and vocab_file")
    if vocab_file is not None:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = [line.split()[0] for line in f if line.strip()]
        if len(set(vocab)) != len(vocab):
            raise ValueError(f"{vocab_file} lists some words twice")
        vocab += [w for w in (UNK, EOS) if w not in vocab]
        return _word_level(vocab)
    counts: Counter[str] = Counter()
    for line in train_texts:
        counts.update(line.split())
    counts.pop(UNK, None)
    counts.pop(EOS, None)
    # Counter keeps first-insertion order, and sorted() is stable: ties stay in order of first appearance.
    words = sorted(counts, key=lambda w: -counts[w])
    return _word_level([UNK, EOS, *words])


ENCODE_CALLS = 0  # batches encoded in this process (the tests read it to check that a second run hits the cache)


def _encode(batch: dict[str, list[str]], tokenizer: PreTrainedTokenizerFast) -> dict[str, list[list[int]]]:
    global ENCODE_CALLS
    ENCODE_CALLS += 1
    # add_special_tokens=False: a tokenizer saved by an earlier version appends <eos> itself; this gives one either way.
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [line + [tokenizer.eos_token_id] for line in ids]}


def tokenize(raw: DatasetDict, tokenizer: PreTrainedTokenizerFast, num_proc: int | None = None) -> DatasetDict:
    """Token ids of every line (with its `<eos>`), column "input_ids", cached by datasets.

    The cache key is the raw split's fingerprint plus the tokenizer's full JSON, so a second run with the same files
    and vocabulary loads the Arrow cache instead of encoding again, and any other vocabulary encodes afresh.
    """
    vocab_key = tokenizer.backend_tokenizer.to_str()
    out = {}
    for split, ds in raw.items():
        out[split] = ds.map(
            _encode,
            batched=True,
            batch_size=10_000,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=ds.column_names,
            num_proc=num_proc,
            new_fingerprint=Hasher.hash(["hf_basis.word_level.v1", ds._fingerprint, vocab_key]),
            desc=f"tokenizing {split}",
        )
    return DatasetDict(out)


def token_stream(ds, max_tokens: int | None = None) -> torch.Tensor:
    """The split as one (N,) int64 stream: its lines' ids concatenated in order (first `max_tokens` if given)."""
    column = ds.with_format("arrow")[:]["input_ids"]  # respects select()/shuffle() indices
    flat = column.combine_chunks().flatten().to_numpy()
    stream = torch.from_numpy(flat.astype("int64", copy=False))
    return stream[:max_tokens] if max_tokens else stream


class BPTTBatches(torch.utils.data.Dataset):
    """Truncated-BPTT batches of a token stream laid out as parallel streams (word_language_model's batchify).

    The stream is cut into `batch_size * world_size` equal contiguous columns (the tail that does not fill a row is
    dropped); process `rank` owns columns rank * batch_size ... (rank + 1) * batch_size - 1. Item k is the k-th window
    of those columns, in order:

        input_ids[j] = column_j[k * bptt : k * bptt + T],  shift_labels[j] = column_j[k * bptt + 1 : k * bptt + T + 1]

    with T = bptt except for a shorter last window, so each column is read once, front to back, and a recurrent state
    carried from item k to item k + 1 continues every stream exactly. Item 0 has `reset_state=True` (start of a pass).
    Read the items in order, one per step, never shuffled or sharded (BPTTTrainer does that).

    Shapes: input_ids, labels, shift_labels: (batch_size, T) int64.
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, bptt: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        columns = batch_size * world_size
        rows = stream.numel() // columns
        if rows < 2:
            raise ValueError(
                f"a stream of {stream.numel()} tokens is too short for {columns} columns (batch_size {batch_size} x "
                f"world size {world_size}): each column needs at least 2 tokens"
            )
        data = stream[: rows * columns].view(columns, rows)  # (columns, rows): row r of column j = token j * rows + r
        self.data = data[rank * batch_size : (rank + 1) * batch_size].contiguous()  # (batch_size, rows)
        self.bptt = bptt
        self.starts = range(0, rows - 1, bptt)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens per pass (over this process's columns)."""
        return self.data.shape[0] * (self.data.shape[1] - 1)

    def __getitem__(self, k: int) -> dict:
        i = self.starts[k]
        t = min(self.bptt, self.data.shape[1] - 1 - i)
        x = self.data[:, i : i + t].contiguous()
        y = self.data[:, i + 1 : i + 1 + t].contiguous()
        return {"input_ids": x, "labels": x, "shift_labels": y, "reset_state": k == 0}


class BlockDataset(torch.utils.data.Dataset):
    """Independent windows of a token stream for stateless models (GPT-2, Llama): item i covers
    input_ids = stream[i*T : i*T + T], shift_labels = stream[i*T + 1 : i*T + T + 1] (T = block_size), so consecutive
    blocks overlap by one token and every token after the first is predicted once. Shapes: (T,) int64.
    """

    def __init__(self, stream: torch.Tensor, block_size: int) -> None:
        if stream.numel() < block_size + 1:
            raise ValueError(f"a stream of {stream.numel()} tokens is shorter than one block of {block_size} + 1")
        self.stream = stream
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.stream.numel() - 1) // self.block_size

    @property
    def num_tokens(self) -> int:
        return len(self) * self.block_size

    def __getitem__(self, i: int) -> dict:
        start = i * self.block_size
        x = self.stream[start : start + self.block_size]
        return {"input_ids": x, "labels": x, "shift_labels": self.stream[start + 1 : start + self.block_size + 1]}
