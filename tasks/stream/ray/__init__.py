"""The Ray executor: the stream as Ray Data actor pools (executor.py), on a cluster started or joined
(session.py), planned and placed on its GPUs (placing.py, cluster.py: placement groups, the node watch), its
writers' ledger (ledger.py). The pipeline and the steps (tasks/stream/) are the same under any executor (a step
only asks Ray where it runs, for its record, when Ray is there)."""
