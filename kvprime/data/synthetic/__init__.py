"""Seeded synthetic retrieval tasks with exact, short gold answers (``kvprime.data.synthetic.tasks``): key-value
retrieval across documents, two hops across documents, and a needle in one long document. Generated, so they
need no asset and no hub; importing the package registers their loaders."""

from kvprime.data.synthetic import tasks  # noqa: F401
