"""kubetune: fine-tune diffusion models on Kubernetes (operator, CLI and API model)."""

__version__ = "0.1.0"
