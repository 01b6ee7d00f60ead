"""Evaluation: the six-category suite of Table 1 (digest §2.1, §9), its scorers and table writer."""

from k25jax.evals.scorers import SCORERS, extract_answer, normalize, score
from k25jax.evals.suite import (CATEGORIES, EvalItem, build_items, default_providers, format_table,
                                register_provider, run_suite, run_suite_choice, world_provider)

__all__ = ["CATEGORIES", "EvalItem", "SCORERS", "build_items", "default_providers", "extract_answer",
           "format_table", "normalize", "register_provider", "run_suite", "run_suite_choice", "score",
           "world_provider"]
