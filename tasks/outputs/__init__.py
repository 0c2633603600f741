"""Output formats: image files, the Parquet manifest, the per-run records."""
