"""The built-in demo: a synthetic knowledge world, pretraining, the LLM Module against the paper's baselines."""

from .run import DemoConfig, completion_answer, run_demo

__all__ = ["DemoConfig", "completion_answer", "run_demo"]
