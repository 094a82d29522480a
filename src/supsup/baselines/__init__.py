"""The paper's GG baselines on the same harness as SupSup: task by task (``learn``, ``accuracy``,
``bytes_stored``), or a whole stream at once (the functions, each returning a ``GGResult``: accuracy after each
task and at the end, bytes stored)."""

from supsup.baselines.bounds import MultiHead, UpperBound, lower_bound, separate_heads, upper_bound
from supsup.baselines.task_conditioned import TaskConditioned, batche, psp

__all__ = ["MultiHead", "TaskConditioned", "UpperBound", "batche", "lower_bound", "psp", "separate_heads",
           "upper_bound"]
