"""The `torchat` command: one module a verb under torchat/cli/, imported only when that verb runs.

`doit list` and `torchat list` must stay free of torch, so a verb's module is imported lazily. The seed's flag
form (`torchat --generate ...`) is rewritten to the verb form. Only this package parses flags; the library
gets typed values (torchat.model_source.ModelSource and plain arguments).
"""

import argparse
import importlib
import os
import sys

from torchat.errors import TorchatError
from torchat.quiet import quiet_libraries
from torchat.threads import prepare_for_pte, runs_pte

# verb -> (module that defines add_arguments(parser, verb) and run(args) -> int, one line for `torchat --help`)
VERBS: dict[str, tuple[str, str]] = {
    "generate": ("torchat.cli.generate", "complete a prompt (any model, checkpoint, target or artifact)"),
    "chat": ("torchat.cli.chat", "a multi-turn conversation in the model's chat format"),
    "server": ("torchat.cli.server", "the OpenAI API and a chat page over any model, with batched decode"),
    "browser": ("torchat.cli.server", "`server`, with its chat page opened in a web browser"),
    "eval": ("torchat.cli.eval", "perplexity and lm-eval tasks; the quality gate of `doit eval:TARGET`"),
    "bench": ("torchat.cli.bench", "prefill and decode speed, memory and size, against llama.cpp"),
    "export": ("torchat.cli.export", "lower a model to AOT Inductor (.pt2, .so) or ExecuTorch (.pte)"),
    "quantize": ("torchat.cli.quantize", "bake a quantized checkpoint (weights + quant.json)"),
    "convert": ("torchat.cli.convert", "any checkpoint format -> torchat's canonical directory"),
    "tokenizer-bin": ("torchat.cli.tokenizer_bin", "write tokenizer.bin for the C++ runners"),
    "runner": ("torchat.cli.runner", "build a C++ runner (aoti or et)"),
    "download": ("torchat.cli.manage", "fetch a catalog model's files, verified by sha256"),
    "list": ("torchat.cli.manage", "the catalog's models and targets, and what the store holds"),
    "where": ("torchat.cli.manage", "the store directory of a model's or target's artifact"),
    "remove": ("torchat.cli.manage", "delete a model's or target's artifacts from the store"),
    "cache": ("torchat.cli.cache", "the remote artifact cache: status, push, pull TARGET, ls, verify, gc"),
}

# the seed's flag form: `torchat --generate ...` == `torchat generate ...`
FLAG_FORMS = {f"--{verb}": verb for verb in ("generate", "chat", "eval", "export")}
# verbs that run a model in their own process: a .pte there needs OpenMP set up before torch loads (threads.py);
# bench runs each measurement in a child and sets it up there
IN_PROCESS_VERBS = ("generate", "chat", "eval")


def _verb_argv(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg in FLAG_FORMS:
            return [FLAG_FORMS[arg], *argv[:i], *argv[i + 1:]]
    return argv


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line (what is wrong and where to look), like every other torchat error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    verbs = "\n".join(f"  {name:<14}{line}" for name, (_, line) in VERBS.items())
    parser = OneLineParser(prog="torchat", description=__doc__.splitlines()[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"verbs:\n{verbs}\n\n`torchat VERB --help` lists a verb's flags.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=OneLineParser)
    for name, (module_name, line) in VERBS.items():
        verb_parser = sub.add_parser(name, help=line, description=line)
        verb_parser.add_argument("--verbose", "-v", action="store_true",
                                 help="also show the libraries' own log lines and warnings")
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _verb_argv(list(sys.argv[1:] if argv is None else argv))
    verb = argv[0] if argv and argv[0] in VERBS else None
    if verb in IN_PROCESS_VERBS and runs_pte(argv):
        prepare_for_pte()
    args = build_parser(verb).parse_args(argv)
    quiet_libraries(args.verbose)
    if getattr(args, "tp", 1) > 1 and "WORLD_SIZE" not in os.environ:
        # run plainly: start the ranks here, as torchrun would (imported by name, like the verbs: see open_model)
        return importlib.import_module("torchat.parallel.launch").spawn_ranks(argv, args.tp, args.device)
    try:
        return importlib.import_module(VERBS[args.verb][0]).run(args)
    except TorchatError as error:
        print(f"torchat {args.verb}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
