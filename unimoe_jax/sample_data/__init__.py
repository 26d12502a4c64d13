"""The embedded synthetic multimodal data set: small, learnable on a CPU, no download.

`make_sample_data(DIR)` writes it and `train_tokenizer(DIR)` the demo's SentencePiece model;
`python tools/make_sample_data.py --output DIR` does both from the command line, and
`python -m unimoe_jax.progressive` before the demo's first stage.

Four media pools per split (one item per index, shared by every manifest of that modality):

  image   coloured shapes on a dark background: colour (6), shape (4), count (1-3)
  video   8 PNG frames of one shape moving left / right / up / down (the official video format
          is a list of frame image files); asked: its colour, shape and axis of motion
          (horizontal / vertical), which the official frame average keeps
  speech  DTMF digit sequences (3-4 digits, 100 ms tones, 50 ms gaps) to transcribe, "3 1 4"
  audio   one linear chirp (0.5-1 s), rising or falling, through a note of octave 4 (12 classes)

and, per split, manifests in the official Uni-MoE JSON format (a list of {id, image | video |
voice, conversations}) under DIR/<split>/: align_* (stage 1 captions), instruct_* (stage 2/3
question answering, some two-turn), instruct_mixed (their shuffled union), eval_*_mc (multiple
choice, answer letter) and eval_*_open (one-word answers; speech: transcription for WER). Media
paths are relative to DIR (`absolute_paths=True` writes absolute ones). DIR/sample_data_info.json
lists every manifest with its purpose, modality, metric and the chance-level baselines measured on
the data written. docs/sample_data.md describes it all.

Everything is a function of `seed`: labels are balanced per split (each class count within one
of the others) and drawn from a split-level generator; nuisance parameters (size, position,
colour jitter, timing, noise) from a per-item generator.

Modules: `catalogue` (the label classes, timings and seeded draws), `media` (the files),
`manifests` (the conversations), `writer` (the data set and its info file, the tokenizer).
"""

from unimoe_jax.sample_data.writer import make_sample_data, train_tokenizer

__all__ = ['make_sample_data', 'train_tokenizer']
