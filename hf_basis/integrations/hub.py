"""Pushing hf_basis checkpoints to the Hugging Face Hub in ONE commit, with the hf_basis model card.

A Hub commit is atomic: if the upload fails or is interrupted, the repository stays at its previous commit. So
the whole folder (weights, config, tokenizer files, README) goes in a single `create_commit`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["push_folder", "push_to_hub"]


def _library_version() -> str:
    from hf_basis.integrations.config import _version

    return _version()


def _remote_readme(api: Any, repo_id: str, revision: str | None, token: Any) -> str | None:
    """The README.md currently on the Hub, or None if there is none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory() as cache:
        try:
            path = hf_hub_download(
                repo_id, "README.md", revision=revision, token=token, cache_dir=cache, endpoint=api.endpoint
            )
        except (EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
            return None
        return Path(path).read_text(encoding="utf-8")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    model: nn.Module | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> Any:
    """Upload every file of `folder` to the model repo `repo_id` in one commit; returns the CommitInfo.

    The repository is created if needed. When `model` (the compressed model the folder holds) is given, the
    hf_basis section of the model card is merged into the README already on the Hub (text outside the section is
    kept, `tags` are added to its metadata); otherwise the folder's README.md is uploaded as it is. Hidden files and
    folders are skipped.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from hf_basis.integrations.model_card import merge_model_card

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    api = HfApi(library_name="hf_basis", library_version=_library_version())
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    operations = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        if rel.as_posix() == "README.md" and model is not None:
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=os.fspath(path)))
    if model is not None:
        readme = merge_model_card(_remote_readme(api, repo_id, revision, token), model, repo_id, tags=tags)
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    if not operations:
        raise ValueError(f"{folder} holds no file to push")
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload hf_basis-compressed model",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def push_to_hub(
    self: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """`PreTrainedModel.push_to_hub` for hf_basis models: same arguments, one commit, hf_basis model card.

    Saves the model to a temporary folder (`save_pretrained`) and uploads it with `push_folder`; the README on
    the Hub keeps its text outside the hf_basis section. `tags` are added to the card's metadata.
    Returns the CommitInfo.
    """
    if kwargs:
        raise TypeError(f"push_to_hub() got unexpected keyword arguments {sorted(kwargs)}")
    with tempfile.TemporaryDirectory() as tmp:
        self.save_pretrained(tmp, max_shard_size=max_shard_size)
        info = push_folder(
            tmp, repo_id, model=self, commit_message=commit_message, commit_description=commit_description,
            private=private, token=token, revision=revision, create_pr=create_pr, tags=tags,
        )  # fmt: skip
    return info
