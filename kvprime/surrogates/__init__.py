"""Surrogate queries: static sources, generated ones, their on-disk store, and query-passage similarity."""
