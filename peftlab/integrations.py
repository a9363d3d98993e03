"""Integrations with other trainers: `from peftlab.integrations import PeftlabCallback`."""
from .trainers.callback import PeftlabCallback

__all__ = ["PeftlabCallback"]
