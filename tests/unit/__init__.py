"""The fast layer: one rule per test, no services, seconds in all (`pytest -m "not slow"`)."""
