"""The command line: the Typer front, the Hydra app, and the commands that are not a plain run."""
