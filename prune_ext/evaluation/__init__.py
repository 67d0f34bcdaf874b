"""Evaluation for sequential model editing: editing metrics and general abilities (pure Python)."""

from .editing_metrics import (
    STYLES,
    EditCase,
    LocalityBaseline,
    evaluate_edits,
    locality_baseline,
    normalize_request,
)
from .generation import generate_greedy, score_continuations
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
    "STYLES",
    "TASKS",
    "EditCase",
    "LocalityBaseline",
    "TaskResult",
    "evaluate_edits",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "extract_number",
    "generate_greedy",
    "load_task",
    "locality_baseline",
    "normalize_answer",
    "normalize_request",
    "perplexity",
    "rouge_mean",
    "score_continuations",
]
