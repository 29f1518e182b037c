"""What persists: model versions on disk (registry), the versions each process serves (model_store),
and Redis state (keys, counters, locks, queues).
"""
