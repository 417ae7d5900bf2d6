"""Drawing helpers shared by the analyses' figures and the reports' (``kvprime.reporting.figures``), on a
matplotlib axes given to them: this module imports no matplotlib itself. Saving a figure is the reports' job."""

from __future__ import annotations


def message(ax, text):
    """A panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555555",
            wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
