"""A run, end to end: conditions, the plan, the session, the runner and its run directory and records."""
