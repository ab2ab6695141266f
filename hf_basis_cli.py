"""`hf-basis`: convert, inspect and share compressed checkpoints from the shell.

    hf-basis convert SRC_DIR OUT_DIR --num-basis 8 --num-clusters 256      # basis embedding (product quantization)
    hf-basis convert SRC_DIR OUT_DIR --method quant --nbit 4                # clipped uniform quantization
    hf-basis report DIR                                                     # the compression table
    hf-basis push DIR user/repo                                             # one commit to the Hugging Face Hub

This front-end (arguments, --help, exit codes) lives outside the hf_basis package on purpose: `import hf_basis`
registers the quantization method with transformers, which imports torch and transformers (seconds). Here they are
imported only once a command runs (hf_basis/cli.py holds the commands).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["EXIT_FAILED", "EXIT_INPUT", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1  # the command was valid but failed while running: the Hub or network, the disk
EXIT_INPUT = 2  # bad input, nothing written: options, a source that cannot be loaded, a model that cannot be converted
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = (
    "exit codes: 0 success; 1 the command failed while running (Hub / network / disk error); 2 bad input, nothing "
    "written (an invalid option, a source that does not exist or cannot be loaded, a model or setting hf_basis "
    "cannot convert, an OUT_DIR that exists without --overwrite or is SRC_DIR); 130 interrupted."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-basis",
        description="Compress the input embedding and lm_head of transformers checkpoints, inspect and share them.",
        epilog=EXIT_CODES,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="compress a dense checkpoint folder into a new folder", epilog=EXIT_CODES,
        description="Load SRC_DIR (a transformers checkpoint folder or Hub id), compress its input embedding and "
        "output layer, and save the result (plus SRC_DIR's tokenizer files) to OUT_DIR.",
    )  # fmt: skip
    p.add_argument("src", metavar="SRC_DIR", help="dense checkpoint: a folder or a Hub model id")
    p.add_argument("out", metavar="OUT_DIR", help="where to write the compressed checkpoint (a new folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing OUT_DIR: its checkpoint is replaced atomically, its other files kept "
                   "(never SRC_DIR itself)")  # fmt: skip
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

    p = sub.add_parser(
        "report", help="print the compression table of a compressed checkpoint", epilog=EXIT_CODES,
        description="Load a compressed checkpoint (checking its tensors) and print what was compressed and saved.",
    )  # fmt: skip
    p.add_argument("dir", metavar="DIR", help="compressed checkpoint: a folder or a Hub model id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "push", help="upload a compressed checkpoint folder to the Hugging Face Hub in one commit", epilog=EXIT_CODES,
        description="Check DIR (it must load), then upload all its files to the model repo REPO in one commit, "
        "with the hf_basis model card merged into the repo's README. The endpoint is HF_ENDPOINT's.",
    )  # fmt: skip
    p.add_argument("dir", metavar="DIR", help="compressed checkpoint folder")
    p.add_argument("repo", metavar="REPO", help="model repo id, e.g. user/my-model (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--revision", default=None, help="branch to push to (default main)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")

    p = sub.add_parser(
        "heal", help="distill a dense checkpoint into its compressed version (recipes/heal.py's options)",
        description="--teacher DIR (--student DIR | --num_basis B --num_clusters K --modules M) (--data_dir DIR | "
        "--dataset NAME) --output_dir OUT [--max_sentences N] [any TrainingArguments option]: see hf_basis.healing.",
        prefix_chars="+", add_help=False,  # every option goes to HfArgumentParser (`hf-basis heal --help` lists them)
    )  # fmt: skip
    p.add_argument("options", nargs=argparse.REMAINDER, help="HealArguments and TrainingArguments options")
    return parser


def _source_problem(path: str, what: str) -> str | None:
    """A source that can be neither a folder here nor a Hub id (transformers would answer "Repo id must be ...")."""
    if os.path.exists(path):
        return None if os.path.isdir(path) else f"{what} {path} is a file, not a checkpoint folder"
    if path.startswith((".", "/", "~")) or os.path.isabs(path) or path.count("/") > 1 or "\\" in path:
        return f"{what} {path} does not exist (give a checkpoint folder or a Hub model id such as user/model)"
    return None


def _path_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the command's paths, found before anything is loaded or written (None: nothing)."""
    if args.command == "report":
        return _source_problem(args.dir, "DIR")
    if args.command == "heal":  # its options are checked by HfArgumentParser and hf_basis.healing
        return None
    if args.command == "push":
        return None if os.path.isdir(args.dir) else f"DIR {args.dir} is not a folder"
    if os.path.isdir(args.src) and Path(args.out).resolve() == Path(args.src).resolve():
        return f"OUT_DIR {args.out} is SRC_DIR: convert writes a new folder and keeps the dense checkpoint"
    if os.path.isfile(args.out):
        return f"OUT_DIR {args.out} is a file"
    if os.path.isdir(args.out) and not args.overwrite:
        return f"OUT_DIR {args.out} exists; pass --overwrite to write into it"
    return _source_problem(args.src, "SRC_DIR")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `hf-basis` with `argv` (default: sys.argv[1:]); returns the exit code (see EXIT_CODES)."""
    args = build_parser().parse_args(argv)  # bad options: usage + one line on stderr, SystemExit(2)
    problem = _path_problem(args)
    if problem:
        print(f"hf-basis {args.command}: error: {problem}", file=sys.stderr)
        return EXIT_INPUT
    # What is being compressed (hf_basis' INFO lines) goes to stderr with the progress bars; stdout keeps the results.
    log = logging.getLogger("hf_basis")
    handler, level = logging.StreamHandler(sys.stderr), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        from hf_basis import cli  # the commands (imports torch and transformers)

        return cli.COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"hf-basis {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from hf_basis.cli import BadInput, CommandFailed

        # What the commands recognise (BadInput, CommandFailed) and the argument / model errors hf_basis and
        # transformers raise (ValueError, TypeError, NotImplementedError) are one line; anything else is a bug: keep
        # its traceback.
        if isinstance(err, CommandFailed):
            code = EXIT_FAILED
        elif isinstance(err, (BadInput, ValueError, TypeError, NotImplementedError)):
            code = EXIT_INPUT
        else:
            raise
        print(f"hf-basis {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return code
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
