"""Surgery: match leaves, align axes, decide novelty, plan, remap (params and training states), verify.

match -> align (with axes) -> novelty -> plan -> remap -> state, verify.
"""
