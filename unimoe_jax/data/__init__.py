"""seqio glue: vocabulary, manifest source, conversation template, media loading, feature
converter, metrics.

TensorFlow and seqio live here and in tasks/ only; nothing in the model imports this package.
"""
