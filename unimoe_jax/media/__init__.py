"""Media preprocessing (numpy, Pillow, librosa, PyAV): images, speech/audio, video.

No TF, no torch."""
