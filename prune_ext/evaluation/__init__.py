"""Evaluation for sequential model editing: editing metrics and general abilities (pure Python).

Every score comes with its sample size (``"n"``) and a 95 % interval (``"intervals"``); see
:mod:`.intervals`. Tasks are looked up in the registry (:mod:`.registry`), one module per task.
"""

from .editing_metrics import (
    STYLES,
    EditCase,
    LocalityBaseline,
    evaluate_edits,
    live_success,
    locality_baseline,
    normalize_request,
)
from .generation import generate_greedy, score_continuations
from .intervals import bootstrap_mean, mean_interval, merge_results, perplexity_interval, wilson
from .registry import REGISTRY, Task, check_task, get_task, register
from .tasks import (
    DEFAULT_TASKS,
    ENV_VAR,
    PROMPTS,
    TASKS,
    TaskResult,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    extract_number,
    load_task,
    normalize_answer,
    perplexity,
    rouge_mean,
)

__all__ = [
    "DEFAULT_TASKS",
    "ENV_VAR",
    "PROMPTS",
    "REGISTRY",
    "STYLES",
    "TASKS",
    "EditCase",
    "LocalityBaseline",
    "Task",
    "TaskResult",
    "bootstrap_mean",
    "check_task",
    "evaluate_edits",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "extract_number",
    "generate_greedy",
    "get_task",
    "live_success",
    "load_task",
    "locality_baseline",
    "mean_interval",
    "merge_results",
    "normalize_answer",
    "normalize_request",
    "perplexity",
    "perplexity_interval",
    "register",
    "rouge_mean",
    "score_continuations",
    "wilson",
]
