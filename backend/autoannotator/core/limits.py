"""Limits that every layer applies alike, stated once."""

# Task texts are cut to this many characters before any model reads them: the members read a few
# hundred tokens anyway, and a megabyte of text must not stall a batch. AUTOANNOTATOR_MAX_TEXT_CHARS
# lowers it for a deployment.
MAX_TEXT_CHARS = 20_000
