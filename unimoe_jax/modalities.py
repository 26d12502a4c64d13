"""The kinds of media Uni-MoE reads, written once for the whole package.

`MODALITIES` is the one order every per-modality table follows: the model's towers
(`network.UniMoE`), the data's `<m>_features` (`data/manifest.py`), the demo's stage-2 runs
and so the order of stage 3's experts (expert e was trained on `MODALITIES[e]`), the sample
data's seeds, and the report's tables. Reordering it is a breaking change to all of them.

No imports: the model, the TensorFlow data path and the TensorFlow-free serving path all read
it.
"""

MODALITIES = ('image', 'video', 'speech', 'audio')

# The text each modality's items stand at, before tokenisation: the vocabulary maps these
# strings to their reserved ids (`data/vocabulary.DEFAULT_PLACEHOLDER_IDS`). Official manifests
# write "<audio>" for speech too; `ManifestConfig.voice_modality` and
# `serving/prompting.place_placeholders` read it as "<speech>" where speech is meant.
PLACEHOLDERS = {m: f'<{m}>' for m in MODALITIES}
