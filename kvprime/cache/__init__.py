"""The KV cache on tensors: transformers internals, segments, scoring, stacked caches, shared prefixes, answer
decoding, batch settings, and tiny random models for the tests."""
