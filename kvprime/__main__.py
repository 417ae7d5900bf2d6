"""``python -m kvprime``: the command line, the same as the ``kvprime`` script (``kvprime.commands.cli``)."""

from .commands.cli import main

if __name__ == "__main__":
    main()
