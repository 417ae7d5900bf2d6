"""Configuration: where conf/ lives, composing configs, the run settings' schema, and plugins."""
