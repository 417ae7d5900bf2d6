"""A run, end to end: the plan, the session, the runner, its records, interrupts and logs."""
