"""Re-export for `guie.plan.gpus`, `guie.plan.timing` and tests/plan/test_timing.py, which still
say `from guie.bench import estimates`: the anchors moved to `guie.plan.estimates`, and the
benchmark suite left the library for the top-level `bench` package (`python -m bench`)."""


def __getattr__(name: str):
    # Resolved on first use, not at import: guie.plan's own import reaches this module (through
    # guie.plan.gpus), so importing guie.plan here would be circular.
    if name == "estimates":
        from guie.plan import estimates
        return estimates
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
