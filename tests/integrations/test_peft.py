"""PEFT on converted models (`hf_basis.integrations.peft`), against dense transformers models built as references.

Each reference is a plain transformers model whose nn.Embedding holds what the adapted compressed layer should
compute (decoded rows, plus the LoRA update or the trained token rows), so PEFT's own dense semantics are the oracle.
"""

import copy

import peft
import pytest
import torch

import hf_basis
from hf_basis.modules.lazy_logits import LazyLogits
from tiny_models import tiny_model

V, H = 300, 32


def pair(tie: bool, method: str = "basis"):
    """A converted tiny Llama and a dense twin whose embedding (and tied head) hold the decoded weights."""
    model = tiny_model("llama", vocab_size=V, hidden=H, tie=tie)
    kwargs = {"num_basis": 4, "num_clusters": 16} if method == "basis" else {"method": "quant", "nbit": 4}
    dense = copy.deepcopy(model)
    hf_basis.convert(model, **kwargs)
    with torch.no_grad():
        dense.model.embed_tokens.weight.copy_(model.get_input_embeddings().weight)
        if not tie:
            dense.lm_head.weight.copy_(model.get_output_embeddings().weight)
    return model, dense


def ids():
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["basis", "quant"])
def test_lora_on_a_compressed_embedding_adds_its_low_rank_rows(tmp_path, method):
    from hf_basis.integrations.peft import get_peft_model, load_peft_model

    model, dense = pair(tie=False, method=method)
    base = copy.deepcopy(model)
    config = peft.LoraConfig(target_modules=["embed_tokens"], r=4, lora_alpha=8, init_lora_weights=False)
    adapted = get_peft_model(model, config)
    layer = adapted.base_model.model.model.embed_tokens
    with torch.no_grad():
        delta = (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T * layer.scaling["default"]
        dense.model.embed_tokens.weight += delta  # PEFT's merged dense weight: W + (B A)^T * scaling
        expected = dense(input_ids=ids()).logits
        torch.testing.assert_close(adapted(input_ids=ids()).logits, expected)
    adapted.train()
    adapted(input_ids=ids(), labels=ids()).loss.backward()
    assert layer.lora_embedding_A["default"].grad is not None
    with pytest.raises(RuntimeError, match="cannot be merged"):
        adapted.merge_and_unload()

    adapted.save_pretrained(tmp_path)
    reloaded = load_peft_model(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, expected)


@pytest.mark.parametrize("tie", [True, False])
def test_trainable_token_indices_replace_those_rows_and_logits(tie):
    from hf_basis.integrations.peft import get_peft_model

    model, dense = pair(tie=tie)
    tokens = [1, 5, 7]
    centroids = model.get_input_embeddings().codebook.centroids
    adapted = get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens, r=4))
    deltas = [m.trainable_tokens_delta["default"] for m in adapted.modules()
              if isinstance(m, peft.tuners.trainable_tokens.layer.TrainableTokensLayer) and not m.tied_adapter]
    assert len(deltas) == 1
    torch.testing.assert_close(deltas[0].detach(), dense.model.embed_tokens.weight[tokens].detach(), rtol=0, atol=0)
    with torch.no_grad():
        deltas[0].normal_()  # as if trained
        dense.model.embed_tokens.weight[tokens] = deltas[0]  # tied: the dense head's rows change with it
        dense_adapted = peft.get_peft_model(dense, peft.LoraConfig(target_modules=["q_proj"], r=4))
        for name, p in adapted.named_parameters():  # same LoRA weights on q_proj in both
            if "lora_" in name:
                dense_adapted.get_parameter(name).copy_(p)
        x = torch.tensor([[1, 2, 5, 7, 7, 299, 0]])
        torch.testing.assert_close(adapted(input_ids=x).logits, dense_adapted(input_ids=x).logits)
    adapted.train()
    adapted(input_ids=x, labels=x).loss.backward()
    assert deltas[0].grad is not None and centroids.grad is None


@pytest.mark.parametrize("init", ["RANDOM", "TEXT"])
def test_prompt_tuning_finds_the_compressed_word_embeddings(tmp_path, init):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_basis.integrations.peft import get_peft_model, load_peft_model

    vocab = {f"w{i}": i for i in range(V)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(tmp_path / "tok")
    model, _ = pair(tie=True)
    base = copy.deepcopy(model)
    kwargs = {"prompt_tuning_init_text": "w11 w22 w33", "tokenizer_name_or_path": str(tmp_path / "tok")}
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=init,
                                     **(kwargs if init == "TEXT" else {}))  # fmt: skip
    adapted = get_peft_model(model, config)
    emb = model.get_input_embeddings()
    assert adapted.word_embeddings is emb and "weight" not in emb._parameters
    prompt = adapted.prompt_encoder["default"].embedding.weight
    if init == "TEXT":  # PEFT repeats the text's tokens to num_virtual_tokens
        torch.testing.assert_close(prompt.detach(), emb.weight[[11, 22, 33, 11]].detach(), rtol=0, atol=0)
    with torch.no_grad():
        out = adapted(input_ids=ids()).logits
        embeds = torch.cat([prompt.detach().expand(2, -1, -1), emb(ids())], dim=1)
        torch.testing.assert_close(out, model(inputs_embeds=embeds).logits)
    adapted.train()
    loss = adapted(input_ids=ids(), labels=ids()).loss
    loss.backward()
    assert prompt.grad is not None and emb.codebook.centroids.grad is None  # prompt tuning freezes the model

    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = load_peft_model(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, out)


def test_modules_to_save_lm_head_keeps_the_fused_loss():
    model, _ = pair(tie=False)
    adapted = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], r=4))
    adapted.train()
    out = adapted(input_ids=ids(), labels=ids())
    assert isinstance(out.logits, LazyLogits)  # the trainable copy of the head ran armed: the loss was fused
    with torch.no_grad():
        reference = adapted(input_ids=ids(), labels=ids()).loss  # grad off: real logits, transformers' loss
    torch.testing.assert_close(out.loss, reference)
    out.loss.backward()
    wrapper = adapted.base_model.model.lm_head
    assert wrapper.modules_to_save["default"].codebook.centroids.grad is not None
    assert wrapper.original_module.codebook.centroids.grad is None
