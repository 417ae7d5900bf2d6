"""Surrogate sources the generator writes: ``generated:<template>`` and ``generated_other:<template>``.

``generated:<template>`` is written by the run's generator (``generation.model``) for the sample's own document:
seeded, stored on disk, the same text in every run that asks for it (``kvprime.surrogates.generation``). With a
builder that primes each document on its own, every passage of a multi-passage sample gets its own.

``generated_other:<template>`` asks whether a generated surrogate helps because it is about *this* document or
merely because it is a well-formed query in the prefix: each sample gets the surrogate (same template, same
generator) of its donor, the sample it is mapped to by the run's seeded derangement of the whole selection
(``kvprime.surrogates.sources.derangement``).

Both are declarations only: the run generates (or reads from the store) the document's text before resolving and
hands it over as ``ctx.generated``.
"""

from __future__ import annotations

from . import register_source


@register_source("generated", arg="<template>", needs=("generated",), per_document=True)
def generated(sample, ctx, arg) -> str:
    """Written by the generator for this document (seeded, stored)."""
    return ctx.generated


@register_source("generated_other", arg="<template>", needs=("generated",), document="donor")
def generated_other(sample, ctx, arg) -> str:
    """The generated surrogate of another document of the run (a seeded derangement)."""
    return ctx.generated
