"""The build graph: one task family per step, one subtask per model or per target (targets/*.toml).

    doit list --all                        every declared task (the matrix)
    doit build:smollm2-135m-int4-aoti      what that target needs, nothing twice
    doit "build:smollm2-135m-*"            a wildcard
    doit -n 2 build                        the whole matrix, two steps at a time
    doit info build:X / doit clean build:X

A target is MODEL-QUANT[-DTYPE]-BACKEND; the dtype may be left out (the backend's default), and any valid name
builds when given on the command line, in the matrix or not. A task is up to date exactly when the artifact
store holds a complete artifact for its current key (torchat/store.py), so doit's own database decides
nothing: deleting it costs no rebuild and can never produce a wrong artifact. Each step runs
`python -m torchat VERB ...` in a subprocess; a verb that does not exist yet fails its task.
"""

import os
import sys

from torchat import spec, store
from torchat.spec import Step, TorchatError  # dodo imports spec and store only

DOCS = {
    Step.DOWNLOAD: "Fetch a model's files, verified by sha256 (MODEL)",
    Step.CONVERT: "Convert a checkpoint to torchat's format: model.safetensors, model_args.json (MODEL)",
    Step.QUANTIZE: "Quantize a converted checkpoint with a preset, in a dtype (MODEL-QUANT-DTYPE)",
    Step.BUILD: "Lower a quantized checkpoint to its backend: eager, aoti (.pt2), et (.pte) (TARGET)",
    Step.TOKENIZER: "Write tokenizer.bin for the C++ runners (MODEL)",
    Step.RUNNER: "Build a C++ runner (BACKEND)",
    Step.EVAL: "Evaluate a target's model (TARGET)",
    Step.BENCH: "Benchmark a target's model (TARGET)",
}


def _declare(tasks: dict, node: spec.Node) -> None:
    if node.name not in tasks[node.step]:
        tasks[node.step][node.name] = node
        for _, dep in node.deps:
            _declare(tasks, dep)


def _graph(catalog: spec.Catalog, argv: list[str]):
    """The matrix's nodes per step, plus the nodes and aliases that command-line names ask for."""
    tasks = {step: {} for step in Step}
    for step in Step:
        for node in catalog.nodes(step):
            _declare(tasks, node)  # with its inputs: an eval reads its model's fp32 baseline, off the matrix too
    aliases = {step: {} for step in Step}
    for arg in argv:
        family, sep, name = arg.partition(":")
        if arg.startswith("-") or not sep or family not in list(Step) or "*" in name or name in tasks[family]:
            continue
        node = catalog.node_for(Step(family), name)  # an unknown name raises, listing the valid choices
        _declare(tasks, node)
        if node.name != name:
            aliases[family][name] = node
    return tasks, aliases


try:
    CATALOG = spec.load_catalog()
    TASKS, ALIASES = _graph(CATALOG, sys.argv[1:])
except TorchatError as error:
    print(f"dodo.py: error: {error}", file=sys.stderr)
    raise SystemExit(2) from None

DOIT_CONFIG = {
    # sqlite3: two doit processes at once each write only their own tasks' rows, under sqlite's lock (the
    # json backend rewrites one file in place; this Python has no gdbm). Its content is advisory anyway.
    "backend": "sqlite3",
    "dep_file": os.environ.get("TORCHAT_DOIT_DB", ".doit.db"),
    "default_tasks": [f"build:{t.name}" for t in CATALOG.targets.values() if t.model.key == CATALOG.default_model],
}


def _realize(node: spec.Node):
    try:
        store.realize(node)
    except TorchatError as error:
        print(f"{node.task}: error: {error}", file=sys.stderr)
        return False
    return None


def _clean(node: spec.Node) -> None:
    for directory in store.remove_named(node):
        print(f"removed {directory}")


def _task(node: spec.Node, name: str | None = None) -> dict:
    alias = name is not None and name != node.name
    return {
        "name": name or node.name,
        "doc": f"= {node.task}" if alias else node.doc,
        "actions": [(_realize, [node])] if node.verb and not alias else None,
        "task_dep": [node.task] if alias else [dep.task for _, dep in node.deps],
        "uptodate": [(store.is_done, [node])],
        "clean": [] if alias else [(_clean, [node])],
    }


def _family(step: Step):
    def generate():
        for node in TASKS[step].values():
            yield _task(node)
        for name, node in ALIASES[step].items():
            yield _task(node, name)
    generate.__doc__ = DOCS[step]
    return generate


task_download = _family(Step.DOWNLOAD)
task_convert = _family(Step.CONVERT)
task_quantize = _family(Step.QUANTIZE)
task_build = _family(Step.BUILD)
task_tokenizer = _family(Step.TOKENIZER)
task_runner = _family(Step.RUNNER)
task_eval = _family(Step.EVAL)
task_bench = _family(Step.BENCH)


if __name__ == "__main__":
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    sys.exit(DoitMain(ModuleTaskLoader(globals())).run(sys.argv[1:]))
