"""The hub: published checkpoints by name (the catalog, data beside the model files) and their verified download
into a local cache (:mod:`streamtsm.hub.download`)."""
