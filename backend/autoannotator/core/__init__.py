"""Pure logic on numpy arrays: label sets, the vote (consensus), routing policies, metrics. Imports
nothing else of ours but errors.
"""
