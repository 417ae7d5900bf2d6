"""Many runs as one: merging shards and reporting sweeps."""
