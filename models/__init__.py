"""The IF cascade: loading, per-row-deterministic stage runners, safety, and a tiny seeded cascade.

Pure torch/diffusers/transformers: nothing here imports Ray, Prefect or s3fs.
"""
