"""The hub: published checkpoints by name (the catalog, data beside the model files) and their verified download
into a local cache (:mod:`streamtsm.hub.download`)."""

from .catalog import Entry, entries, fetch, get_entry, is_cached, is_entry_name, label_names

__all__ = ["Entry", "entries", "fetch", "get_entry", "is_cached", "is_entry_name", "label_names"]
