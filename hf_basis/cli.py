"""The commands of `hf-basis` (convert, report, push); the argument parser, --help, the checks of the paths and the
exit codes are in hf_basis_cli.py (outside this package, so that none of them imports torch / transformers).

Each command takes the parsed arguments and returns 0, or raises BadInput (nothing was written; exit code 2) or
CommandFailed (exit code 1) with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

__all__ = ["COMMANDS", "BadInput", "CommandFailed"]


class BadInput(Exception):
    """The command's input is unusable (a missing source, an existing output, ...); nothing was written."""


class CommandFailed(Exception):
    """A valid command failed while running (the Hub or the network, the disk)."""


# Files `convert` does not copy from SRC_DIR: the model's own (written anew) and weights.
_MODEL_FILES = {"config.json", "generation_config.json", "README.md"}
_NOT_COMPRESSED = "{} is not an hf_basis checkpoint (its config.json has no hf_basis quantization_config)"


def _say(message: str) -> None:
    """Progress of a command, on stderr (stdout holds the results: the table, the JSON)."""
    print(message, file=sys.stderr, flush=True)


# A checkpoint whose config names no class transformers has: the first of these that accepts it.
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModel")


def _load(path: str, what: str, dtype: str = "auto"):
    """Load a model from a folder or Hub id with the class its config names (or the fitting Auto class).

    A source transformers cannot read (no config.json, not on the Hub, offline) is BadInput, in one line. (The
    front-end has already refused paths that can be neither a folder nor a Hub id.)"""
    import torch
    import transformers

    from hf_basis.loading import NoModelClass, load_model

    _say(f"loading {path}")
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "" if os.path.isdir(path) else f" (there is no folder {path} here either)"
        raise BadInput(f"cannot load {what} {path}: {' '.join(str(err).split())}{where}") from err
    try:
        return load_model(path, config, _AUTO_CLASSES, **kwargs)
    except NoModelClass as err:
        raise BadInput(str(err)) from err


def _copy_extras(src: Path, out: Path) -> list[str]:
    """Copy tokenizer and other non-model files of `src` into `out` (not weights, configs or README)."""
    from hf_basis.integrations.serialization import _WEIGHT_FILE

    copied = []
    for item in sorted(src.iterdir()):
        name = item.name
        if name.startswith(".") or item.is_dir() or name in _MODEL_FILES or _WEIGHT_FILE.match(name):
            continue
        shutil.copy2(item, out / name)
        copied.append(name)
    return copied


def _cmd_convert(args: argparse.Namespace) -> int:
    import hf_basis

    model = _load(args.src, "SRC_DIR", args.dtype)
    kwargs = {"method": args.method, "modules": args.modules, "seed": args.seed}
    if args.method == "basis":
        kwargs.update(num_basis=args.num_basis, num_clusters=args.num_clusters)
    else:
        kwargs.update(nbit=args.nbit, stochastic_round=args.stochastic_round)
    hf_basis.convert(model, **kwargs)
    _say(f"saving to {args.out}")
    try:
        model.save_pretrained(args.out)
        copied = _copy_extras(Path(args.src), Path(args.out)) if os.path.isdir(args.src) else []
    except OSError as err:
        raise CommandFailed(f"saving to {args.out} failed: {err}") from err
    if copied:
        _say(f"copied from {args.src}: {', '.join(copied)}")
    print(hf_basis.report(model))
    _say(f"saved to {args.out}")
    return 0


def _folder_bytes(path: str) -> int | None:
    if not os.path.isdir(path):
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _cmd_report(args: argparse.Namespace) -> int:
    import hf_basis

    model = _load(args.dir, "DIR")
    if getattr(model, "hf_basis_config", None) is None:
        raise BadInput(_NOT_COMPRESSED.format(args.dir))
    rep = hf_basis.report(model)
    size = _folder_bytes(args.dir)
    if args.json:
        print(json.dumps(rep.to_dict() | {"settings": model.hf_basis_config, "folder_bytes": size}, indent=2))
    else:
        from hf_basis.integrations.config import BasisConfig

        print(f"{type(model).__name__}: {BasisConfig.from_hf_basis_config(model.hf_basis_config).settings()}")
        print(rep)
        if size is not None:
            print(f"folder on disk: {size / 2**20:.2f} MiB")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from hf_basis.integrations.hub import push_folder

    model = _load(args.dir, "DIR")  # refuses a checkpoint whose tensors do not match its quantization_config
    if getattr(model, "hf_basis_config", None) is None:
        raise BadInput(_NOT_COMPRESSED.format(args.dir))
    from huggingface_hub import constants

    _say(f"pushing {args.dir} to {args.repo} at {constants.ENDPOINT}")
    try:
        info = push_folder(
            args.dir, args.repo, model=model, commit_message=args.commit_message, private=args.private or None,
            token=args.token, revision=args.revision,
        )  # fmt: skip
    except Exception as err:  # httpx / huggingface_hub errors: the network, the Hub's answer, the token
        message = " ".join(str(err).split()) or "no message"
        raise CommandFailed(f"push to {args.repo} at {constants.ENDPOINT} failed: {type(err).__name__}: {message}")
    print(f"pushed {args.dir} to {args.repo}: {info.commit_url}")
    return 0


def _cmd_heal(args: argparse.Namespace) -> int:
    from transformers import HfArgumentParser, TrainingArguments

    from hf_basis.healing import HealArguments, heal

    heal_args, training = HfArgumentParser((HealArguments, TrainingArguments)).parse_args_into_dataclasses(
        args=["--report_to", "none", "--save_strategy", "no", *args.options])
    results = heal(heal_args, training, command="hf-basis heal " + " ".join(args.options))
    print(json.dumps({k: results[k] for k in ("before_healing", "after_code_refit", "after_healing")}))
    print(f"saved to {training.output_dir}")
    return 0


COMMANDS = {"convert": _cmd_convert, "report": _cmd_report, "push": _cmd_push, "heal": _cmd_heal}
