"""Research tools that measure the engine: simulate, sweep, benchmarks, plots, install-encoder. Never
imported by the service.
"""
