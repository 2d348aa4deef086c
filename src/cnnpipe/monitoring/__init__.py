"""Watching a served model: what it saw at training time (the reference), what it served (the prediction log),
and whether the two still agree (drift)."""
