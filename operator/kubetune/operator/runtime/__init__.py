"""The operator's runtime: Kopf's handlers, the work queue and its workers, the stores, the Lease,
the probes and metrics, rank 0's progress reader and the Kubernetes client.

It carries out what the decision modules of `kubetune.operator` (reconcile, status, actions,
render, ...) decide; they never import it, nor Kopf, the Kubernetes client or aiohttp.
"""
