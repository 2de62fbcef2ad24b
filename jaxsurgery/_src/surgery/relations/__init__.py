"""The relation pass: the new program interpreted against the old one (see engine.py)."""
