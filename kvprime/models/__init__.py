"""Loading weights and tokenizers: the scored and generator models from a ``conf/model`` entry (``loading``),
random-weight models of a real architecture (``shape_random``), and the sentence-embedding model of the
similarity measures (``embedder``)."""
