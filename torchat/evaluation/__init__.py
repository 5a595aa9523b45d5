"""Evaluation through lm-eval: an adapter for any TextModel, the offline perplexity task, and the quality gate.

    from torchat.evaluation import evaluate
    result = evaluate(text_model, tokenizer, ["botchan"])      # {"results": {"botchan": {"word_perplexity": ...}}}

The adapter (torchat.evaluation.adapter) imports lm-eval; importing this package does not.
"""

from torchat.evaluation.harness import evaluate
from torchat.evaluation.tasks import DEFAULT_LIMIT, DEFAULT_TASKS, LOCAL_TASKS

__all__ = ["DEFAULT_LIMIT", "DEFAULT_TASKS", "LOCAL_TASKS", "evaluate"]
