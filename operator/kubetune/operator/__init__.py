"""The kubetune operator: turns FineTuneJobs into trainer pods and keeps their status true.

The modules here are the decisions: pure functions that render children, compute status,
judge restarts and plan actions, tested table-driven, behind the `Cluster` protocol
(`cluster`). `runtime/` carries them out: Kopf's handlers, the work queue, the stores, the
Lease, probes and metrics, and the Kubernetes client; the decisions never import it, Kopf,
the Kubernetes client or aiohttp. Nothing here imports torch, diffusers or the trainer.
"""
