"""Run-directory files, below everything that writes them: atomic writes, JSON/JSONL, the score log
(``results_io``), and run directories with their locks and ``latest`` link (``rundir``). Imports nothing of
kvprime's but ``kvprime.errors``."""
