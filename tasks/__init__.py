"""The batch side of ifbatch: prompt tables, the Ray stage pipeline, outputs, manifests, resume, Prefect tasks."""
