"""Encoders: the interface (`base.Encoder`) and the registry of loaders."""
from distill.encoders.base import Encoder, MissingHeadError

__all__ = ["Encoder", "MissingHeadError"]
