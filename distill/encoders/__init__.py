"""Encoders: the interface (`base.Encoder`) and the registry of loaders (`registry.load_encoder`)."""
from distill.encoders.base import Encoder, MissingHeadError

__all__ = ["Encoder", "MissingHeadError", "load_encoder", "list_loaders"]


def load_encoder(spec: str, **kwargs) -> Encoder:
    """See `distill.encoders.registry.load_encoder` (imported lazily: loaders pull in model libraries)."""
    from distill.encoders.registry import load_encoder as _load
    return _load(spec, **kwargs)


def list_loaders():
    from distill.encoders.registry import list_loaders as _list
    return _list()
