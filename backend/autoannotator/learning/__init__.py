"""Where labels become models: the verified pool, cold start, encoder adaptation, catalog selection,
refinement and its gate.
"""
