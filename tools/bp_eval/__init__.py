"""bp-eval: held-out loss, answers and task metrics with intervals, compare and gate."""
