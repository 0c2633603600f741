"""Prompt tables in: reading, validation, ids and seeds, and every row's effective stage parameters."""
