"""Re-export for `guie.plan.gpus`, `guie.plan.timing` and tests/plan/test_timing.py, which still
say `from guie.bench import estimates`: the anchors moved to `guie.plan.estimates`, and the
benchmark suite left the library for the top-level `bench` package (`python -m bench`)."""
from guie.plan import estimates  # noqa: F401
