"""From a run directory's files to its tables, figures and report."""
