"""Primitives shared by the decoder, the encoders and the connectors."""
