"""`hf-basis`: convert, inspect and share compressed checkpoints from the shell.

    hf-basis convert SRC_DIR OUT_DIR --num-basis 8 --num-clusters 256      # basis embedding (product quantization)
    hf-basis convert SRC_DIR OUT_DIR --method quant --nbit 4                # clipped uniform quantization
    hf-basis report DIR                                                     # the compression table
    hf-basis push DIR user/repo                                             # one commit to the Hugging Face Hub
    hf-basis heal --teacher DIR --num_basis 16 --data_dir DIR --output_dir OUT  # distill the dense model back in
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

__all__ = ["main"]

# Files `convert` does not copy from SRC_DIR: the model's own (written anew) and weights.
_MODEL_FILES = {"config.json", "generation_config.json", "README.md"}
_NOT_COMPRESSED = "{} is not an hf_basis checkpoint (its config.json has no hf_basis quantization_config)"


def _load(path: str, dtype: str = "auto"):
    """Load a model from a folder or Hub id with the class its config names (or the fitting Auto class)."""
    import torch
    import transformers

    import hf_basis  # noqa: F401  (registers the "hf_basis" quantization method)

    try:  # the LSTM model registers itself with the Auto classes
        import hf_basis.models.lstm  # noqa: F401
    except ImportError:
        pass
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    config = transformers.AutoConfig.from_pretrained(path)
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained(path, **kwargs)
    errors = []
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModel"):
        try:
            return getattr(transformers, auto).from_pretrained(path, **kwargs)
        except ValueError as err:  # "Unrecognized configuration class ... for this kind of AutoModel"
            errors.append(f"{auto}: {err}")
    raise ValueError(f"cannot find a model class for {path}:\n" + "\n".join(errors))


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

    model = _load(args.src, args.dtype)
    kwargs = {"method": args.method, "modules": args.modules, "seed": args.seed}
    if args.method == "basis":
        kwargs.update(num_basis=args.num_basis, num_clusters=args.num_clusters)
    else:
        kwargs.update(nbit=args.nbit, stochastic_round=args.stochastic_round)
    hf_basis.convert(model, **kwargs)
    model.save_pretrained(args.out)
    if os.path.isdir(args.src):
        copied = _copy_extras(Path(args.src), Path(args.out))
        if copied:
            print(f"copied from {args.src}: {', '.join(copied)}")
    print(hf_basis.report(model))
    print(f"saved to {args.out}")
    return 0


def _folder_bytes(path: str) -> int | None:
    if not os.path.isdir(path):
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _cmd_report(args: argparse.Namespace) -> int:
    import hf_basis

    model = _load(args.dir)
    if getattr(model, "hf_basis_config", None) is None:
        raise ValueError(_NOT_COMPRESSED.format(args.dir))
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

    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"{args.dir} is not a folder")
    model = _load(args.dir)  # refuses a checkpoint whose tensors do not match its quantization_config
    if getattr(model, "hf_basis_config", None) is None:
        raise ValueError(_NOT_COMPRESSED.format(args.dir))
    info = push_folder(
        args.dir, args.repo, model=model, commit_message=args.commit_message, private=args.private or None,
        token=args.token, revision=args.revision,
    )  # fmt: skip
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-basis",
        description="Compress the input embedding and lm_head of transformers checkpoints, inspect and share them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="compress a dense checkpoint folder into a new folder",
        description="Load SRC_DIR (a transformers checkpoint folder or Hub id), compress its input embedding and "
        "output layer, and save the result (plus SRC_DIR's tokenizer files) to OUT_DIR.",
    )  # fmt: skip
    p.add_argument("src", metavar="SRC_DIR", help="dense checkpoint: a folder or a Hub model id")
    p.add_argument("out", metavar="OUT_DIR", help="where to write the compressed checkpoint")
    p.add_argument("--method", choices=("basis", "quant"), default="basis",
                   help="basis: product quantization with trainable centroids (default); quant: clipped uniform "
                   "quantization (frozen)")  # fmt: skip
    p.add_argument("--num-basis", type=int, default=8, help="method basis: sub-vectors per word (default 8)")
    p.add_argument("--num-clusters", type=int, default=256, help="method basis: centroids per sub-space (default 256)")
    p.add_argument("--nbit", type=int, default=4, help="method quant: bits per value, 1/2/4/8/16/32 (default 4)")
    p.add_argument("--modules", choices=("both", "input", "output"), default="both",
                   help="which layers to compress (default both)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="k-means / stochastic-rounding seed (default 0)")
    p.add_argument("--stochastic-round", action="store_true", help="method quant: stochastic rounding")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype to load SRC_DIR in (default: the checkpoint's)")  # fmt: skip
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "report", help="print the compression table of a compressed checkpoint",
        description="Load a compressed checkpoint (checking its tensors) and print what was compressed and saved.",
    )  # fmt: skip
    p.add_argument("dir", metavar="DIR", help="compressed checkpoint: a folder or a Hub model id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "push", help="upload a compressed checkpoint folder to the Hugging Face Hub in one commit",
        description="Check DIR (it must load), then upload all its files to the model repo REPO in one commit, "
        "with the hf_basis model card merged into the repo's README. The endpoint is HF_ENDPOINT's.",
    )  # fmt: skip
    p.add_argument("dir", metavar="DIR", help="compressed checkpoint folder")
    p.add_argument("repo", metavar="REPO", help="model repo id, e.g. user/my-model (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--revision", default=None, help="branch to push to (default main)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser(
        "heal", help="distill a dense checkpoint into its compressed version (recipes/heal.py's options)",
        description="--teacher DIR (--student DIR | --num_basis B --num_clusters K --modules M) (--data_dir DIR | "
        "--dataset NAME) --output_dir OUT [--max_sentences N] [any TrainingArguments option]: see hf_basis.healing.",
        prefix_chars="+", add_help=False,  # every option goes to HfArgumentParser (`hf-basis heal --help` lists them)
    )  # fmt: skip
    p.add_argument("options", nargs=argparse.REMAINDER, help="HealArguments and TrainingArguments options")
    p.set_defaults(func=_cmd_heal)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"hf-basis {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
