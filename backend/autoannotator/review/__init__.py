"""Secondary review of routed tasks: the Reviewer protocol and the LLM reviewer (prices, answer cache)."""
