"""Statistics, routing and the analysis registry (kvprime's own analyses are this package's modules)."""
