"""kvprime's own cache builders, one module each: every module of this package registers its builder when
``kvprime.builders`` imports it (package discovery; no list kept by hand)."""
