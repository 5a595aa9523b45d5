"""Run lm-eval tasks on a TextModel: the local tasks by name (offline), any other name as lm-eval knows it.

    result = evaluate(model, tokenizer, ["botchan"], limit=8)
    result["results"]["botchan"]["word_perplexity"]
"""

import contextlib
import os
import time
from pathlib import Path

from torchat.errors import TorchatError
from torchat.evaluation.tasks import DEFAULT_LIMIT, LOCAL_TASKS

# lm-eval's datasets would otherwise make one HEAD request per run, even for a local JSON file
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def default_limit(tasks: list[str], limit: int | float | None) -> int | float | None:
    """--limit as given; unset, local tasks alone run DEFAULT_LIMIT documents each, a list with a hub task all."""
    if limit is not None:
        return None if limit == 0 else limit
    return DEFAULT_LIMIT if all(task in LOCAL_TASKS for task in tasks) else None


def evaluate(model, tokenizer, tasks: list[str], limit: int | float | None = None, max_length: int | None = None,
             cache: Path | None = None) -> dict:
    """lm-eval's results for `tasks` on a TextModel, as plain JSON data:

    {"results": {task: {metric: value}}, "samples": {task: documents}, "tokens": scored tokens,
     "seconds": wall time, "settings": {"tasks", "limit", "max_length"}}

    limit: documents per task (a fraction below 1: that share of them); None: default_limit's choice; 0: all.
    """
    from torchat.sources import cache_dir

    cache = Path(cache or cache_dir())
    tasks = list(tasks)
    local = [name for name in tasks if name in LOCAL_TASKS]
    env = dict(OFFLINE_ENV) if len(local) == len(tasks) else {}
    if len(local) == len(tasks) and "HF_HOME" not in os.environ:
        env["HF_HOME"] = str(cache / "huggingface")  # datasets writes its cache there
    limit = default_limit(tasks, limit)
    with _environment(env):
        import lm_eval
        from lm_eval.tasks import TaskManager

        from torchat.evaluation.adapter import TorchatLM

        lm = TorchatLM(model, tokenizer, max_length)
        configs = [LOCAL_TASKS[name](cache) if name in LOCAL_TASKS else name for name in tasks]
        start = time.perf_counter()
        try:
            # lm-eval's own task index is scanned only when a task needs it (a few seconds)
            manager = TaskManager(include_defaults=len(local) < len(tasks))
            output = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=0,
                                             log_samples=False, task_manager=manager)
        except (KeyError, ValueError) as error:
            hub = [name for name in tasks if name not in LOCAL_TASKS]
            raise TorchatError(f"lm-eval could not run the tasks {hub} ({error}); the local tasks are: "
                               f"{', '.join(sorted(LOCAL_TASKS))} (other names need lm-eval's task registry and "
                               "the Hugging Face hub)") from None
        seconds = time.perf_counter() - start
    results = {name: {key.partition(",")[0]: value for key, value in metrics.items()
                      if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
               for name, metrics in output["results"].items()}
    samples = {name: counts.get("effective", counts.get("original"))
               for name, counts in output.get("n-samples", {}).items()}
    return {"results": results, "samples": samples, "tokens": lm.tokens_scored, "seconds": round(seconds, 2),
            "settings": {"tasks": tasks, "limit": limit, "max_length": lm.max_length}}
