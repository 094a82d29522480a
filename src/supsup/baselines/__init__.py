"""The paper's GG baselines on the same harness as SupSup; each returns a ``GGResult`` (accuracy after
each task and at the end, bytes stored)."""

from supsup.baselines.bounds import lower_bound, separate_heads, upper_bound
from supsup.baselines.task_conditioned import batche, psp

BASELINES = {"upper-bound": upper_bound, "lower-bound": lower_bound, "separate-heads": separate_heads,
             "batche": batche, "psp": psp}

__all__ = ["BASELINES", "batche", "lower_bound", "psp", "separate_heads", "upper_bound"]
