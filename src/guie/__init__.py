"""GUIE submission kit."""
