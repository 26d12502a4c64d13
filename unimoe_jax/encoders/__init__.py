"""Frozen modality encoders: CLIP ViT (images, video frames), Whisper (speech), BEATs (audio)."""
