"""`torchat eval`: lm-eval tasks on any model form, the offline perplexity task by default, and the quality gate.

    torchat eval [MODEL | --checkpoint-dir D | --gguf-path F] [--compile] [--quant JSON]
    torchat eval --aoti-package-path m.pt2 | --dso-path m.so | --pte-path m.pte
    torchat eval ... --tasks botchan,hellaswag --limit 20 --max-seq-length 1024 --output-dir OUT
    torchat eval --table                      # the eval results in the artifact store, one table

The build graph's form (`doit eval:TARGET`) names a store artifact and the baseline to compare with:
    torchat eval --artifact-dir D --backend B --checkpoint-dir CONVERTED --baseline-dir EVAL_OF_FP32 \\
        --max-degradation-pct 5 --label TARGET --output-dir OUT
It writes OUT/eval.json, prints the table, and fails when the word perplexity is more than the bound over the
baseline's. `botchan` (the default) runs offline; other task names are lm-eval's and need the hub.
"""

import argparse
import json
import sys
from pathlib import Path

from torchat.errors import TorchatError
from torchat.loader import add_model_arguments

DEFAULT_MAX_SEQ_LEN = 2048  # the eager KV cache unless --max-seq-length says otherwise (what export defaults to)


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
    from torchat.evaluation.tasks import DEFAULT_LIMIT, DEFAULT_TASK, LOCAL_TASKS

    add_model_arguments(parser)
    parser.add_argument("--tasks", type=_tasks, default=[DEFAULT_TASK],
                        help=f"comma-separated lm-eval tasks (default: {DEFAULT_TASK}; local, offline: "
                             f"{', '.join(sorted(LOCAL_TASKS))}; any other name is lm-eval's own)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help=f"documents per task, a fraction below 1, or 'all' (default: {DEFAULT_LIMIT} for "
                             f"{DEFAULT_TASK} alone, else all)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help=f"tokens per forward call (rolling windows, context cut): default the exported "
                             f"artifact's KV cache, or {DEFAULT_MAX_SEQ_LEN} (within the model's context) for eager")
    parser.add_argument("--compile", action="store_true", help="torch.compile the eager model (dynamic shapes)")
    parser.add_argument("--quant", help="quantize the eager model first, as `torchat quantize --quant` takes it")
    parser.add_argument("--output-dir", type=Path, help="write eval.json there")
    parser.add_argument("--label", help="the name shown in the table (default: the model's path)")
    graph = parser.add_argument_group("build graph (doit eval:TARGET)")
    graph.add_argument("--artifact-dir", type=Path, help="a store artifact: a quantized checkpoint (eager) or the "
                                                         "directory of a build's model.pt2 / model.pte")
    graph.add_argument("--backend", help="the artifact's backend: eager, aoti or et")
    graph.add_argument("--baseline-dir", type=Path, help="an eval.json (or its directory) to compare with")
    graph.add_argument("--max-degradation-pct", type=float, default=None,
                       help="fail when word perplexity is more than this many percent over the baseline's")
    parser.add_argument("--table", action="store_true", help="print the eval results in the artifact store")


def run(args: argparse.Namespace) -> int:
    from torchat.evaluation import evaluate
    from torchat.evaluation.gate import (RESULT_FILE, compare, failure_message, read_result, render_table,
                                         table_rows)

    if args.table:
        print(render_table(store_table_rows()))
        return 0
    if args.max_degradation_pct is not None and args.baseline_dir is None:
        raise TorchatError("--max-degradation-pct needs --baseline-dir (the eval.json to compare with)")
    baseline = read_result(args.baseline_dir) if args.baseline_dir else None  # before the long run: fail early
    model, tokenizer, description = load_eval_model(args)
    result = evaluate(model, tokenizer, args.tasks, args.limit, args.max_seq_length)
    result = {"label": args.label or description.pop("label"), "model": description, **result}
    if baseline is not None:
        result["gate"] = compare(result, baseline, args.max_degradation_pct)
        result["baseline"] = {"label": baseline.get("label", ""), "results": baseline["results"]}
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / RESULT_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    rows = (table_rows(baseline) if baseline else []) + table_rows(result)
    print(render_table(rows))
    print(f"{result['tokens']} tokens scored in {result['seconds']:.1f} s", file=sys.stderr)
    if baseline is not None and not result["gate"]["passed"]:
        raise TorchatError(failure_message(result["label"], result["gate"]))
    return 0


def load_eval_model(args: argparse.Namespace):
    """(TextModel, tokenizer, description) from the flags: a store artifact, an exported file, a quantized
    checkpoint directory, or any checkpoint (quantized here with --quant)."""
    from torchat.generate import EagerModel
    from torchat.loader import artifact_path, find_tokenizer, load_artifact, load_eager
    from torchat.quant import is_quantized_dir
    from torchat.tokenizers import load_tokenizer

    if args.artifact_dir is not None:
        return load_store_artifact(args)
    if args.backend is not None:
        raise TorchatError("--backend goes with --artifact-dir; for a file, use --aoti-package-path, --dso-path "
                           "or --pte-path")
    exported = artifact_path(args)
    if exported is not None:
        if args.quant or args.compile:
            raise TorchatError(f"{exported} is already exported; --quant and --compile apply to eager models")
        model, tokenizer = load_artifact(args, exported)
        return model, tokenizer, describe_exported(model, exported)
    path = args.checkpoint_dir or args.checkpoint_path
    if path is not None and is_quantized_dir(path):
        if args.quant:
            raise TorchatError(f"{path} is already quantized (quant.json); drop --quant")
        from torchat.quant import load_quantized

        model = load_quantized(path, args.device)
        tokenizer = load_tokenizer(args.tokenizer_path or find_tokenizer(path, {}), args.tokenizer_kind)
    else:
        model, tokenizer, _ = load_eager(args)
        path = path or args.gguf_path or (Path(args.model) if args.model else default_model_path())
        if args.quant:
            import torch

            from torchat.quant import parse_quant, quantize_model

            with torch.no_grad():
                print(quantize_model(model, parse_quant(args.quant), tokenizer).summary(), file=sys.stderr)
    context = model.args.max_seq_len
    cache = args.max_seq_length or min(context, DEFAULT_MAX_SEQ_LEN)
    if cache > context:
        raise TorchatError(f"--max-seq-length {cache} is beyond the model's context of {context} tokens")
    text_model = EagerModel(model, cache, compile=args.compile, compile_prefill=args.compile)
    return text_model, tokenizer, describe_eager(model, Path(path), args)


def load_store_artifact(args: argparse.Namespace):
    """The graph's form: --artifact-dir holds the target's model as its backend publishes it; the tokenizer is
    the converted checkpoint's (--checkpoint-dir), from which every backend's copy came."""
    from torchat.loader import find_tokenizer, load_artifact
    from torchat.spec import BACKENDS, Backend

    if args.backend not in list(Backend):
        raise TorchatError(f"--artifact-dir needs --backend, one of: {', '.join(Backend)} (got {args.backend!r})")
    output = BACKENDS[Backend(args.backend)].output
    if args.checkpoint_dir is not None and args.tokenizer_path is None:
        args.tokenizer_path = find_tokenizer(args.checkpoint_dir, {})
    if output is not None:
        model, tokenizer = load_artifact(args, args.artifact_dir / output)
        return model, tokenizer, describe_exported(model, args.artifact_dir / output)
    args.checkpoint_dir, args.artifact_dir, args.backend = args.artifact_dir, None, None
    return load_eval_model(args)


def default_model_path() -> Path:
    from torchat.assets import fetch_asset
    from torchat.loader import DEFAULT_MODEL_ASSET

    return fetch_asset(DEFAULT_MODEL_ASSET)  # already fetched by load_eager: a cache hit


def describe_eager(model, path: Path, args: argparse.Namespace) -> dict:
    from torchat.quant import is_quantized_dir

    dtype = str(model.norm.weight.dtype).removeprefix("torch.")
    if is_quantized_dir(path):
        quant = json.loads((path / "quant.json").read_text())["specs"]
    else:
        from torchat.quant import parse_quant

        quant = [s.to_dict() for s in parse_quant(args.quant)] if args.quant else []
    return {"label": path.name, "backend": "eager", "compile": bool(args.compile), "dtype": dtype, "quant": quant,
            "source": str(path)}


def describe_exported(model, path: Path) -> dict:
    metadata = model.metadata
    return {"label": path.name, "backend": metadata.backend, "format": path.suffix, "dtype": metadata.dtype,
            "quant": metadata.quant, "source": str(path), "build_key": metadata.build_key}


def store_table_rows() -> list[list[str]]:
    """The newest eval artifact of each name in the store, as table rows."""
    from torchat import store
    from torchat.evaluation.gate import RESULT_FILE, read_result, table_rows

    newest = {}
    for directory, manifest in store.artifacts("eval"):
        if (directory / RESULT_FILE).is_file() and manifest.get("created", "") >= newest.get(
                manifest["name"], ("", None))[0]:
            newest[manifest["name"]] = (manifest.get("created", ""), directory)
    if not newest:
        raise TorchatError(f"no eval results in {store.artifacts_dir()}; run `doit eval:TARGET` first")
    return [row for name in sorted(newest) for row in table_rows(read_result(newest[name][1]))]
