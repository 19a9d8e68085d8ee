"""Data: file readers, encoding in one prompt format, named splits, digests, synthetic facts, packaged files."""
