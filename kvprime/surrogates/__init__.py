"""Surrogate queries: their sources, generated ones and the generator, the on-disk store, per-document
surrogates, and surrogate quality."""
