"""Surgery: match leaves, relate the new program to the old one, plan, remap (params and states), verify.

match -> relations (align's touch signatures for axes the dataflow leaves open) -> plan -> remap -> state, verify.
"""
