"""The gradient probe (the paper's gradient mapping) and its cross-check against the boolean table.

walk (primitive classes) -> static (the static walk) -> contact (contact-local
evaluation) -> compile (jitted, cached, chunked) -> gradient_table -> evidence
-> cross_check.
"""
