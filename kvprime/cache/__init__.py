"""The KV cache: transformers internals, segments, the engine that builds and scores primed caches, models."""
