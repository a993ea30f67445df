"""Experiments reproducing the papers' findings: each returns pandas DataFrames and saves its work
units as it goes (resumable, see :mod:`.store`); every one has "small" / "medium" / "paper" sizes."""
