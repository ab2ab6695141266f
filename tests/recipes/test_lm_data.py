"""Recipe data and trainer pieces: word-level tokenizer, cached tokenisation, stream layouts (BPTT order, DDP split),
the shipped perplexity metric, and BPTTTrainer's stateful evaluation."""

import io
import json
import math
import os
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, EvalPrediction, TrainingArguments

import hf_basis.metrics
from hf_basis.models.lstm import STATE_FIELD, LSTMLMConfig, LSTMLMForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "recipes"))

import lm_data  # noqa: E402
from lm_data import BlockDataset, BPTTBatches, build_tokenizer, load_corpus, token_stream, tokenize  # noqa: E402
from lm_trainer import BPTTTrainer, LMTrainer, PerplexityMetric, SGDWithAdamGroups, token_nll  # noqa: E402

LINES = [" the cat sat on the mat ", " the dog sat ", "", " a zebra ran "]
TESTS = os.path.join(os.path.dirname(__file__), "..")
RECIPES = os.path.join(TESTS, "..", "recipes")


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "ptb"
    d.mkdir()
    for split, lines in (("train", LINES), ("valid", [" the cat ran "]), ("test", [" a dog sat on a mat "])):
        (d / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    return str(d)


def test_tokenizer_word_level_prompts_without_eos(tmp_path):
    """A prompt encodes to its words only: generate() must not continue after an appended <eos> (issue 16, 8)."""
    tok = build_tokenizer(LINES)
    assert tok.convert_tokens_to_ids(["<unk>", "<eos>", "the", "sat"]) == [0, 1, 2, 3]  # specials, then by count
    assert len(tok) == 2 + len({w for line in LINES for w in line.split()})
    ids = tok(" the cat flew ")["input_ids"]
    assert ids == [2, tok.convert_tokens_to_ids("cat"), 0]  # unknown word -> <unk>, no <eos>
    assert tok(" the cat flew ", add_special_tokens=True)["input_ids"] == ids
    assert tok("")["input_ids"] == []
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(" the cat flew ")["input_ids"] == ids
    assert loaded.eos_token == "<eos>" and loaded.unk_token == "<unk>"


def test_tokenizer_from_dict_file(tmp_path):
    vocab = tmp_path / "dict.txt"
    vocab.write_text("zebra 3\nthe 10\n<eos> 5\n")  # extra columns (counts) are ignored
    tok = build_tokenizer(vocab_file=str(vocab))
    assert tok.convert_tokens_to_ids(["zebra", "the", "<eos>", "<unk>"]) == [0, 1, 2, 3]
    assert tok(" the cat ")["input_ids"] == [1, 3]
    vocab.write_text("a\na\n")
    with pytest.raises(ValueError, match="twice"):
        build_tokenizer(vocab_file=str(vocab))


def test_load_corpus_from_files_and_cached_tokenisation(corpus_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
        load_corpus("ptb", str(tmp_path / "nowhere"))
    cache = str(tmp_path / "cache")
    raw = load_corpus("ptb", corpus_dir, cache_dir=cache)
    assert raw["train"]["text"] == LINES
    tok = build_tokenizer(raw["train"]["text"])
    calls = lm_data.ENCODE_CALLS
    first = tokenize(raw, tok)
    assert lm_data.ENCODE_CALLS == calls + 3  # one batch per split
    stream = token_stream(first["train"])
    eos = tok.eos_token_id
    expected = [i for line in LINES for i in [*tok(line)["input_ids"], eos]]  # the training data ends lines in <eos>
    assert expected.count(eos) == len(LINES)
    assert stream.tolist() == expected and stream.dtype == torch.int64
    picked = tok(LINES[1])["input_ids"] + [eos] + tok(LINES[3])["input_ids"] + [eos]
    assert token_stream(first["train"].select([1, 3])).tolist() == picked
    assert token_stream(first["train"], max_tokens=5).tolist() == expected[:5]
    # A second run (new load, same files and vocabulary) reads the Arrow cache instead of encoding again.
    again = tokenize(load_corpus("ptb", corpus_dir, cache_dir=cache), build_tokenizer(LINES))
    assert lm_data.ENCODE_CALLS == calls + 3
    assert again["train"].cache_files == first["train"].cache_files
    # Another vocabulary must not hit that cache.
    tokenize(raw, build_tokenizer(LINES + [" new words "]))
    assert lm_data.ENCODE_CALLS == calls + 6


def test_unreachable_corpus_is_one_line_that_names_data_dir(tmp_path, monkeypatch, capsys):
    """Offline, `make train` printed a 70-line traceback twice and never mentioned --data_dir (issue 16, point 1).
    conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, so the Hub cannot be reached here."""
    import train_ptb
    import train_wikitext

    with pytest.raises(lm_data.CorpusNotFound, match="ptb-text-only/ptb_text_only.*--data_dir DIR"):
        load_corpus("ptb", cache_dir=str(tmp_path / "cache"))
    for script, defaults, files in ((train_ptb, train_ptb.PTB_DEFAULTS, "ptb.train.txt, ptb.valid.txt, ptb.test.txt"),
                                    (train_wikitext, train_wikitext.WIKITEXT_DEFAULTS, "wiki.train.tokens")):
        monkeypatch.setattr(sys, "argv", [script.__file__, "--output_dir", str(tmp_path / "out"),
                                          "--cache_dir", str(tmp_path / "cache")])  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            script.run(defaults)
        message = str(exit_info.value.code)  # sys.exit(str): printed on stderr, exit status 1
        assert message.startswith("error: could not load") and "\n" not in message
        assert files in message and 'make train ARGS="--data_dir DIR"' in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(lm_data.CorpusNotFound, match="ptb.train.txt"):
        load_corpus("ptb", str(tmp_path / "nowhere"))  # a FileNotFoundError, as before


def _parquet(column: str, rows: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({column: rows}), buffer)
    return buffer.getvalue()


HUB_CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from lm_data import load_corpus
corpora = {name: load_corpus(name, cache_dir=sys.argv[2]) for name in ("ptb", "wikitext-2")}
print("RESULT " + json.dumps({name: {split: ds["text"][:] for split, ds in raw.items()} for name, raw in corpora.items()}))
"""


@pytest.mark.slow
def test_default_corpora_load_from_the_hub_layout(tmp_path):
    """The recipes' default data path (no --data_dir) through datasets' real Hub client, against the local Hub
    serving both corpora in the Hub's layout (issue 16, point 11): PTB's script-based main branch and its parquet
    export (penn_treebank/{split}/0000.parquet, no dataset card), WikiText's parquet files named by the card's
    `configs`. It found that PTB's config must be read as a folder of the export: by name, datasets refused it."""
    from hub_server import HubServer

    splits = ("train", "validation", "test")
    ptb = {split: [f" {split} sentence one ", f" the {split} two "] for split in splits}
    wiki = {split: [" = Title = ", "", f" {split} text @-@ here "] for split in splits}
    card = "\n".join(["---", "configs:"] + [
        line for cfg in ("wikitext-2-raw-v1", "wikitext-2-v1")
        for line in [f"- config_name: {cfg}", "  data_files:"]
        + [f"  - split: {split}\n    path: {cfg}/{split}-*" for split in splits]] + ["---", "# WikiText"])  # fmt: skip
    with HubServer() as hub:
        hub.add_dataset("ptb-text-only/ptb_text_only", {"README.md": b"# PTB", "ptb_text_only.py": b"# a script"})
        hub.add_dataset("ptb-text-only/ptb_text_only", {f"penn_treebank/{split}/0000.parquet":
                        _parquet("sentence", rows) for split, rows in ptb.items()}, branch="refs/convert/parquet")
        wiki_files = {f"{cfg}/{split}-00000-of-00001.parquet": _parquet("text", [f"{cfg}:{r}" for r in rows])
                      for cfg in ("wikitext-2-raw-v1", "wikitext-2-v1") for split, rows in wiki.items()}
        hub.add_dataset("Salesforce/wikitext", {"README.md": card.encode(), **wiki_files})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # fmt: skip
        run = subprocess.run([sys.executable, "-c", HUB_CLIENT, RECIPES, str(tmp_path / "cache")],
                             env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["ptb"] == ptb  # column "sentence" renamed to "text", every split
    assert result["wikitext-2"] == {split: [f"wikitext-2-v1:{r}" for r in rows] for split, rows in wiki.items()}
    assert any("/datasets/ptb-text-only/ptb_text_only/resolve/" in path for _, path in hub.requests)


def test_readme_generation_from_a_saved_ptb_model(tmp_path, monkeypatch):
    """The README's three lines that generate from a `make train` output folder (issue 16, point 8)."""
    import hf_basis

    tokenizer = build_tokenizer(LINES)
    config = LSTMLMConfig(vocab_size=len(tokenizer), emsize=16, nhid=16, nlayers=1, eos_token_id=tokenizer.eos_token_id)
    model = LSTMLMForCausalLM(config)
    hf_basis.convert(model, num_basis=4, num_clusters=4, modules="output")
    monkeypatch.chdir(tmp_path)
    model.save_pretrained("outputs/ptb_basis_output")
    tokenizer.save_pretrained("outputs/ptb_basis_output")

    from transformers import AutoModelForCausalLM

    # --- as printed in the README ("Generate from a trained model") ---
    model = AutoModelForCausalLM.from_pretrained("outputs/ptb_basis_output")
    tokenizer = AutoTokenizer.from_pretrained("outputs/ptb_basis_output")
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids                 # the prompt, no <eos>
    print(tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=True)[0]))
    # ---
    assert ids.tolist() == [tokenizer.convert_tokens_to_ids(["the", "cat", "sat"])]
    assert type(model.get_output_embeddings()).__name__ == "BasisLinear"


def test_bptt_batches_read_each_column_in_order():
    stream = torch.arange(103)
    batches = BPTTBatches(stream, batch_size=4, bptt=5)
    rows = 103 // 4  # 25 tokens per column; 3 dropped
    columns = stream[: 4 * rows].view(4, rows)
    assert len(batches) == math.ceil((rows - 1) / 5)
    seen = torch.cat([batches[k]["input_ids"] for k in range(len(batches))], dim=1)
    torch.testing.assert_close(seen, columns[:, :-1])  # every column read front to back, nothing skipped
    for k in range(len(batches)):
        item = batches[k]
        for j in range(4):  # the k-th batch of stream j is the k-th bptt slice of column j
            start = k * 5
            t = min(5, rows - 1 - start)
            assert item["input_ids"][j].tolist() == columns[j, start : start + t].tolist()
            assert item["shift_labels"][j].tolist() == columns[j, start + 1 : start + 1 + t].tolist()
        assert item["labels"] is item["input_ids"]
        assert item["reset_state"] == (k == 0)
    assert batches[len(batches) - 1]["input_ids"].shape == (4, 4)  # shorter last window
    assert batches.num_tokens == 4 * (rows - 1)


def test_bptt_batches_ddp_split():
    stream = torch.arange(1000)
    world = 3
    single = BPTTBatches(stream, batch_size=2 * world, bptt=7)
    ranks = [BPTTBatches(stream, batch_size=2, bptt=7, rank=r, world_size=world) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(single)
    for k in range(len(single)):
        # rank r owns columns 2r, 2r + 1 of the world_size * batch_size column layout, read in the same order
        torch.testing.assert_close(torch.cat([r[k]["input_ids"] for r in ranks]), single[k]["input_ids"])
        torch.testing.assert_close(torch.cat([r[k]["shift_labels"] for r in ranks]), single[k]["shift_labels"])
    with pytest.raises(ValueError, match="rank"):
        BPTTBatches(stream, 2, 7, rank=3, world_size=3)
    with pytest.raises(ValueError, match="too short"):
        BPTTBatches(torch.arange(10), batch_size=8, bptt=5)


def test_block_dataset_predicts_every_token_once():
    stream = torch.arange(50)
    blocks = BlockDataset(stream, block_size=8)
    assert len(blocks) == 6
    targets = torch.cat([blocks[i]["shift_labels"] for i in range(len(blocks))])
    torch.testing.assert_close(targets, stream[1:49])
    torch.testing.assert_close(blocks[2]["input_ids"], stream[16:24])


def test_perplexity_metric_module_offline():
    metric = evaluate.load(hf_basis.metrics.PERPLEXITY)
    result = metric.compute(nll=[2.0, 4.0], num_tokens=[1, 2])
    assert result["perplexity"] == pytest.approx(math.exp(2.0)) and result["num_tokens"] == 3
    metric.add_batch(nll=[1.0, 2.0], num_tokens=[1, 1])
    metric.add_batch(nll=[6.0], num_tokens=[2])
    assert metric.compute()["perplexity"] == pytest.approx(math.exp(9.0 / 4))


def test_perplexity_metric_ignores_padding():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, -100], [4, 5, 6]])
    nll = token_nll(logits, (targets, targets))
    expected = F.cross_entropy(logits.view(-1, 7), targets.view(-1), ignore_index=-100)
    padded = np.pad(nll.numpy(), [(0, 0), (0, 2)], constant_values=-100)  # as the Trainer pads batches
    padded_targets = np.pad(targets.numpy(), [(0, 0), (0, 2)], constant_values=-100)
    result = PerplexityMetric()(EvalPrediction(predictions=padded, label_ids=(padded_targets, padded_targets)))
    assert result["num_tokens"] == 5
    assert result["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


def _stateful_nll(model, batches):
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for k in range(len(batches)):
            item = batches[k]
            out = model(item["input_ids"], past_key_values=state, use_cache=True)
            state = out[STATE_FIELD]
            total += F.cross_entropy(out.logits.flatten(0, 1), item["shift_labels"].flatten(), reduction="sum").item()
            count += item["shift_labels"].numel()
    return total, count


def test_bptt_trainer_carries_the_state(tmp_path):
    torch.manual_seed(0)
    model = LSTMLMForCausalLM(LSTMLMConfig(vocab_size=30, emsize=8, nhid=8, nlayers=1, dropout=0.0))
    stream = torch.randint(0, 30, (400,))
    valid = BPTTBatches(stream, batch_size=3, bptt=6)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to="none",
                             label_names=["labels", "shift_labels"], use_cpu=True)
    trainer = BPTTTrainer(model=model, args=args, eval_dataset=valid, compute_metrics=PerplexityMetric(),
                          preprocess_logits_for_metrics=token_nll)
    metrics = trainer.evaluate()
    total, count = _stateful_nll(model.eval(), valid)
    assert metrics["eval_num_tokens"] == count
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Without the carried state the numbers differ: the test above does check the state.
    stateless = sum(F.cross_entropy(model(valid[k]["input_ids"]).logits.flatten(0, 1),
                                    valid[k]["shift_labels"].flatten(), reduction="sum").item()
                    for k in range(len(valid)))
    assert abs(stateless - total) > 1e-3
    # A second evaluation starts again from a zero state (reset_state on the first window).
    assert trainer.evaluate()["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-6)


def test_centroid_learning_rate_gets_its_own_group(tmp_path):
    model = LSTMLMForCausalLM(LSTMLMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=1))
    hf_basis.convert(model, num_basis=2, num_clusters=4, modules="output")
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=20.0, optim="sgd", report_to="none", use_cpu=True)
    trainer = LMTrainer(model=model, args=args, centroid_learning_rate=2.0)
    optimizer = trainer.create_optimizer()
    groups = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert groups[id(model.lm_head.codebook.centroids)] == 2.0
    assert groups[id(model.lm_head.bias)] == 20.0 and groups[id(model.encoder.weight)] == 20.0
    assert len(groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_sgd_with_adam_groups_matches_torch_sgd_and_adam():
    torch.manual_seed(0)
    a, b, c = torch.randn(5, 3), torch.randn(7), torch.randn(4)
    mine = [x.clone().requires_grad_() for x in (a, b, c)]
    ref = [x.clone().requires_grad_() for x in (a, b, c)]
    decay = 6
    opt = SGDWithAdamGroups([{"params": [mine[0]], "momentum": 0.9, "weight_decay": 0.1},
                             {"params": [mine[1]], "adam": True, "lr": 0.01, "weight_decay": 0.01},
                             {"params": [mine[2]], "adam": True, "lr": 0.02, "decay_steps": decay}], lr=0.5)
    sgd = torch.optim.SGD([ref[0]], lr=0.5, momentum=0.9, weight_decay=0.1)
    adam = torch.optim.Adam([ref[1]], lr=0.01, weight_decay=0.01)
    adam_decayed = torch.optim.Adam([ref[2]], lr=0.02)
    for step in range(1, 5):
        grads = [torch.randn(5, 3), torch.randn(7), torch.randn(4)]
        for params in (mine, ref):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.step()
        sgd.step()
        adam.step()
        adam_decayed.param_groups[0]["lr"] = 0.02 * (1 - step / decay)  # linear decay, by hand
        adam_decayed.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["state"][1]["step"] == 4  # the Adam state checkpoints with the optimizer


def test_basis_optimizer_adam_gives_the_basis_parameters_adam_steps(tmp_path):
    model = LSTMLMForCausalLM(LSTMLMConfig(vocab_size=40, emsize=8, nhid=8, nlayers=1))
    hf_basis.convert(model, num_basis=2, num_clusters=4, modules="output")
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=20.0, optim="sgd", report_to="none", use_cpu=True)
    trainer = LMTrainer(model=model, args=args, basis_optimizer="adam", basis_learning_rate=1e-2)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, SGDWithAdamGroups) and trainer.create_optimizer() is optimizer
    groups = {id(p): (g["lr"], g["adam"]) for g in optimizer.param_groups for p in g["params"]}
    assert groups[id(model.lm_head.codebook.centroids)] == groups[id(model.lm_head.bias)] == (1e-2, True)
    assert groups[id(model.encoder.weight)] == (20.0, False)
    assert len(groups) == sum(1 for p in model.parameters() if p.requires_grad)
    trainer.create_scheduler(num_training_steps=123)
    assert [g["decay_steps"] for g in optimizer.param_groups if g["adam"]] == [123]
    with pytest.raises(ValueError, match="basis_learning_rate"):
        LMTrainer(model=model, args=args, basis_optimizer="adam")
    adamw = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="optim='sgd'"):
        LMTrainer(model=model, args=adamw, basis_optimizer="adam", basis_learning_rate=1e-2)
    with pytest.raises(ValueError, match="basis_optimizer must be one of"):
        LMTrainer(model=model, args=args, basis_optimizer="lion", basis_learning_rate=1e-2)
