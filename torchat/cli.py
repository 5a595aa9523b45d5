"""The `torchat` command: one verb per module, imported only when that verb runs.

`doit list` and `torchat list` must stay free of torch, so a verb's module is imported lazily. The seed's flag
form (`torchat --generate ...`) is rewritten to the verb form.
"""

import argparse
import importlib
import sys

from torchat.errors import TorchatError
from torchat.threads import prepare_for_pte, runs_pte

# verb -> module that defines add_arguments(parser) and run(args) -> int
VERBS = {
    "generate": "torchat.generate_cli",
    "chat": "torchat.chat",
    "convert": "torchat.convert",
    "quantize": "torchat.quantize_cli",
    "export": "torchat.export_cli",
    "eval": "torchat.eval_cli",
    "bench": "torchat.bench_cli",
    "tokenizer-bin": "torchat.tokenizer_bin",
    "runner": "torchat.runner_build",
    "download": "torchat.manage",
    "list": "torchat.manage",
    "where": "torchat.manage",
    "remove": "torchat.manage",
}

# verbs that run a model in their own process: a .pte there needs OpenMP set up before torch loads (threads.py);
# bench runs each measurement in a child and sets it up there
IN_PROCESS_VERBS = ("generate", "chat", "eval")

# the seed's flag form: `torchat --generate ...` == `torchat generate ...`
FLAG_FORMS = {f"--{verb}": verb for verb in ("generate", "chat", "eval", "export")}


def _verb_argv(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg in FLAG_FORMS:
            return [FLAG_FORMS[arg], *argv[:i], *argv[i + 1:]]
    return argv


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line (what is wrong and where to look), like every other torchat error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="torchat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=OneLineParser)
    for name, module_name in VERBS.items():
        verb_parser = sub.add_parser(name)
        if name == verb:
            importlib.import_module(module_name).add_arguments(verb_parser, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _verb_argv(list(sys.argv[1:] if argv is None else argv))
    verb = argv[0] if argv and argv[0] in VERBS else None
    if verb in IN_PROCESS_VERBS and runs_pte(argv):
        prepare_for_pte()
    args = build_parser(verb).parse_args(argv)
    try:
        return importlib.import_module(VERBS[args.verb]).run(args)
    except TorchatError as error:
        print(f"torchat {args.verb}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
