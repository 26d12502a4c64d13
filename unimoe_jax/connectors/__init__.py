"""Trainable connectors from encoder features to the LLM embedding space."""
