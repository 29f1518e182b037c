"""The voters: specialists (transformer, linear, encoder-backed) and the ensemble that asks them all."""
