"""kubetune: QLoRA fine-tuning as Kubernetes resources."""

__version__ = "0.1.0"
