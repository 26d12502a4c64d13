"""Checkpoint conversion (numpy state dicts in, our parameter trees out)."""
