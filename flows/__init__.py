"""Prefect flows (thin: the work lives in tasks/ and models/) and the `ifbatch` command line."""
