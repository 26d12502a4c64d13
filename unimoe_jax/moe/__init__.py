"""Sparse mixture-of-experts: routing, dispatch paths, and the MoE FFN module."""
