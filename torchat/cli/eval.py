"""`torchat eval`: lm-eval tasks on any model form, the offline perplexity task by default, and the quality gate.

    torchat eval [MODEL | TARGET | PATH | --checkpoint-dir D | --gguf-path F] [--compile] [--quant JSON]
    torchat eval --aoti-package-path m.pt2 | --dso-path m.so | --pte-path m.pte
    --max-seq-length N: tokens per forward call (rolling windows, context cut); default the exported
    artifact's KV cache, or the default cache length (torchat.vocabulary) for a checkpoint
    torchat eval ... --tasks botchan,hellaswag --limit 20 --max-seq-length 1024 --output-dir OUT
    torchat eval --table                      # the eval results in the artifact store, one table

The build graph's form (`doit eval:TARGET`) names a store artifact and the baseline to compare with:
    torchat eval --artifact-dir D --backend B --checkpoint-dir CONVERTED --baseline-dir EVAL_OF_FP32 \\
        --max-degradation-pct 5 --label TARGET --output-dir OUT
It writes OUT/eval.json, prints the table, and fails when the word perplexity is more than the bound over the
baseline's on every task. `botchan` (prose) and `shakespeare` (verse), the defaults, run offline; other task
names are lm-eval's and need the hub.
"""

import argparse
import json
import sys
from pathlib import Path

from torchat.cli.flags import add_model_flags, add_parallel_flags, model_source
from torchat.errors import TorchatError
from torchat.vocabulary import BACKENDS, Backend


def _tasks(value: str) -> list[str]:
    tasks = [t for t in value.split(",") if t]
    if not tasks:
        raise argparse.ArgumentTypeError("name at least one task")
    return tasks


def _limit(value: str) -> int | float:
    if value == "all":
        return 0
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {value!r}: a number of documents, a fraction below 1, or "
                                         "'all'") from None
    if number < 0 or (number >= 1 and number != int(number)):
        raise argparse.ArgumentTypeError(f"--limit {value!r}: a number of documents, a fraction below 1, or 'all'")
    return number if number < 1 else int(number)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from torchat.evaluation.tasks import DEFAULT_LIMIT, DEFAULT_TASKS, LOCAL_TASKS

    add_model_flags(parser)
    add_parallel_flags(parser)
    parser.add_argument("--tasks", type=_tasks, default=list(DEFAULT_TASKS),
                        help=f"comma-separated lm-eval tasks (default: {','.join(DEFAULT_TASKS)}; local, offline: "
                             f"{', '.join(sorted(LOCAL_TASKS))}; any other name is lm-eval's own)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help=f"documents per task, a fraction below 1, or 'all' (default: {DEFAULT_LIMIT} for "
                             "local tasks alone, else all)")
    parser.add_argument("--output-dir", type=Path, help="write eval.json there")
    parser.add_argument("--label", help="the name shown in the table (default: the model's path)")
    graph = parser.add_argument_group("build graph (doit eval:TARGET)")
    graph.add_argument("--artifact-dir", type=Path, help="a store artifact: a quantized checkpoint (eager) or the "
                                                         "directory of a build's model.pt2 / model.pte")
    graph.add_argument("--backend", choices=list(Backend), help="what --artifact-dir holds")
    graph.add_argument("--baseline-dir", type=Path, help="an eval.json (or its directory) to compare with")
    graph.add_argument("--max-degradation-pct", type=float, default=None,
                       help="fail when word perplexity is more than this many percent over the baseline's")
    parser.add_argument("--table", action="store_true", help="print the eval results in the artifact store")


def run(args: argparse.Namespace) -> int:
    from torchat.evaluation import evaluate
    from torchat.evaluation.gate import (RESULT_FILE, compare, failure_message, read_result, render_table,
                                         store_table_rows, table_rows)
    from torchat.model_source import open_model

    if args.table:
        print(render_table(store_table_rows()))
        return 0
    if args.max_degradation_pct is not None and args.baseline_dir is None:
        raise TorchatError("--max-degradation-pct needs --baseline-dir (the eval.json to compare with)")
    baseline = read_result(args.baseline_dir) if args.baseline_dir else None  # before the long run: fail early
    opened = open_model(graph_source(args))
    # a compiled eval model sees many prompt lengths: its prefill compiles with dynamic shapes
    result = evaluate(opened.text_model, opened.tokenizer, args.tasks, args.limit, args.max_seq_length)
    # no "source"/"path": a path is where this store lies, not what was evaluated (build_key and label say that)
    description = {k: v for k, v in opened.description.items() if k not in ("model_args", "path", "kind", "source")}
    result = {"label": args.label or description.pop("label"), "model": description, **result}
    if baseline is not None:
        result["gate"] = compare(result, baseline, args.max_degradation_pct)
        result["baseline"] = {"label": baseline.get("label", ""), "results": baseline["results"]}
    if args.output_dir:
        from torchat.publish import publish_file

        with publish_file(args.output_dir / RESULT_FILE) as scratch:
            scratch.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    rows = (table_rows(baseline) if baseline else []) + table_rows(result)
    print(render_table(rows))
    print(f"{result['tokens']} tokens scored in {result['seconds']:.1f} s", file=sys.stderr)
    if baseline is not None and not result["gate"]["passed"]:
        raise TorchatError(failure_message(result["label"], result["gate"]))
    return 0


def graph_source(args: argparse.Namespace):
    """The model source of the flags; the build graph's form names a store artifact directory and its backend
    (the tokenizer is the converted checkpoint's, --checkpoint-dir, from which every backend's copy came)."""
    from dataclasses import replace

    from torchat.model_source import find_tokenizer

    if args.artifact_dir is None:
        if args.backend is not None:
            raise TorchatError("--backend goes with --artifact-dir; for a file, name it as MODEL")
        source = model_source(args)
    else:
        if args.backend is None:
            raise TorchatError(f"--artifact-dir needs --backend, one of: {', '.join(Backend)}")
        output = BACKENDS[Backend(args.backend)].output
        tokenizer = args.tokenizer_path or (find_tokenizer(args.checkpoint_dir) if args.checkpoint_dir else None)
        flags = argparse.Namespace(**{**vars(args), "checkpoint_dir": None})  # --checkpoint-dir lends the tokenizer
        source = replace(model_source(flags), checkpoint=args.artifact_dir / output if output else args.artifact_dir,
                         tokenizer_path=tokenizer)
    if args.compile:
        source = replace(source, compile_prefill=True)
    return source
