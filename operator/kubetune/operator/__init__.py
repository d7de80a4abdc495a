"""The kubetune operator: turns FineTuneJobs into trainer pods and keeps their status true.

Pure pieces (rendering children, computing status, restart and lease policies) hold the
logic and are tested table-driven; `handlers` and `main` only wire them to Kopf and the
cluster. Nothing here imports torch, diffusers or the trainer.
"""
