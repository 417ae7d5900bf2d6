"""Surrogate-to-query cosine similarity with all-MiniLM-L6-v2 (the notebooks' embedding model), offline.

The model comes from the packaged asset (`kvprime setup`); sentence-transformers loads it from that folder with
``local_files_only=True``, so a missing asset is an error, never a download attempt, and the process's environment
is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import assets


class Embedder:
    def __init__(self, folder: str | None = None, device: str = "cpu"):
        self.folder, self.device, self._model = folder, device, None

    @property
    def model(self):
        if self._model is None:
            # lazy: sentence_transformers and torch; data loading and reports import this module without them
            from sentence_transformers import SentenceTransformer

            folder = self.folder or str(assets.fetch("all_minilm_l6_v2"))
            self._model = SentenceTransformer(folder, device=self.device, local_files_only=True)
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text."""
        return np.asarray(self.model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float64)

    def cosine_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """cos(a, b) for each pair; every distinct text is embedded once."""
        texts = sorted({t for pair in pairs for t in pair})
        if not texts:
            return []
        index = {t: i for i, t in enumerate(texts)}
        emb = self.embed(texts)
        return [float(emb[index[a]] @ emb[index[b]]) for a, b in pairs]
