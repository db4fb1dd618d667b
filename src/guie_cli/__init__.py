"""Entry points of the kit (`submit.py`). The `guie` library never imports this package."""
