"""push_to_hub / from_pretrained(repo) through huggingface_hub's real HTTP client, against a local Hub (issue 5,
points 3 and 5). huggingface_hub reads HF_ENDPOINT when it is imported, so the client side runs in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hub_server import HubServer

TESTS = Path(__file__).resolve().parents[1]

CLIENT = textwrap.dedent(
    """
    import json, sys, urllib.request
    import torch
    import hf_basis
    from huggingface_hub import HfApi
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from compressed_models import compressed_model, inputs, logits

    endpoint, out_dir = sys.argv[1], sys.argv[2]
    result = {}
    vocab = {f"w{i}": i for i in range(300)}
    tokenizer_model = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer_model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, unk_token="w0")

    # 1. push a compressed model and its tokenizer, load both back from the repo
    model = compressed_model("gpt2", "basis", tie=True)
    commit = model.push_to_hub("user/tiny")
    tokenizer.push_to_hub("user/tiny")
    loaded = AutoModelForCausalLM.from_pretrained("user/tiny")
    loaded_tokenizer = AutoTokenizer.from_pretrained("user/tiny")
    ids = loaded_tokenizer("w1 w5 w7 w299", return_tensors="pt").input_ids
    result["tokens"] = ids.tolist()
    result["identical"] = torch.equal(logits(loaded, ids), logits(model, ids))
    result["tied"] = loaded.get_input_embeddings().codebook is loaded.get_output_embeddings().codebook
    api = HfApi()
    result["head"] = api.model_info("user/tiny").sha
    result["model_commit"] = commit.oid

    # 2. an interrupted push: the server drops the connection half-way through the commit
    with torch.no_grad():
        model.get_input_embeddings().codebook.centroids.add_(1.0)
    urllib.request.urlopen(urllib.request.Request(endpoint + "/_test/fail-next-commit", data=b"", method="POST"))
    try:
        model.push_to_hub("user/tiny")
        result["interrupted_push"] = "no error"
    except Exception as err:
        result["interrupted_push"] = type(err).__name__
    result["head_after_failure"] = api.model_info("user/tiny").sha
    again = AutoModelForCausalLM.from_pretrained("user/tiny", force_download=True)
    result["still_first_version"] = torch.equal(logits(again, ids), logits(loaded, ids))

    # 3. the CLI: hf-basis push DIR REPO
    from hf_basis_cli import main
    model.save_pretrained(out_dir)
    result["cli"] = main(["push", out_dir, "user/from-cli"])
    from_cli = AutoModelForCausalLM.from_pretrained("user/from-cli")
    result["cli_identical"] = torch.equal(logits(from_cli, ids), logits(model, ids))

    # 4. save_pretrained(..., push_to_hub=True)
    model.save_pretrained(out_dir + "_2", push_to_hub=True, repo_id="user/via-save")
    via_save = AutoModelForCausalLM.from_pretrained("user/via-save")
    result["via_save_identical"] = torch.equal(logits(via_save, ids), logits(model, ids))
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_push_and_load_through_a_local_hub(tmp_path):
    with HubServer() as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(
            HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
            TOKENIZERS_PARALLELISM="false",
        )  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-c", CLIENT, hub.url, str(tmp_path / "cli_dir")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))

        assert result["tokens"] == [[1, 5, 7, 299]]
        assert result["identical"] and result["tied"]

        # The interrupted push raised, and the remote stayed at the previous commit with the same files.
        assert result["interrupted_push"] != "no error"
        assert result["head_after_failure"] == result["head"] == hub.head("user/tiny")
        assert hub.commit_messages("user/tiny") == ["initial commit", "Upload hf_basis-compressed model",
                                                    "Upload tokenizer"]  # fmt: skip
        assert result["still_first_version"]

        files = hub.files("user/tiny")
        expected_files = {"config.json", "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"}
        assert expected_files <= set(files)
        config = json.loads(files["config.json"])
        assert config["quantization_config"]["quant_method"] == "hf_basis"
        # The model's files went up in one commit (no LFS / Xet: the local hub answers "regular" for every file).
        assert set(hub.files("user/tiny", result["model_commit"])) >= {"config.json", "model.safetensors", "README.md"}
        card = files["README.md"].decode()
        for text in ("hf_basis", "basis embedding", "num_basis | `4`", "num_clusters | `16`", "x** on the compressed",
                     "python -m build", "import hf_basis"):  # fmt: skip
            assert text in card, text
        assert 'AutoModelForCausalLM.from_pretrained("user/tiny")' in card

        assert result["cli"] == 0 and result["cli_identical"]
        assert result["via_save_identical"]
        assert "README.md" in hub.files("user/from-cli")
