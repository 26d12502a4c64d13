"""The official loss masking of a Vicuna v1 prompt (Uni-MoE's `preprocess_va`, LLaVA's
`preprocess_v1`), written from the official code as the tests' reference for
`data/conversation.py`."""

SEP = ' ASSISTANT: '


def official_labels(prompt, tokenize):
  """(ids, labels, whole) of `prompt`: `tokenize(text)` gives ids with one leading BOS, as the
  official `tokenizer_image_audio_video_token`; labels are the ids with -100 where no loss.
  `whole` is False where the official code reports a tokenization mismatch (the rounds'
  lengths do not add up to the prompt's), and then every label is -100."""
  ids = tokenize(prompt)
  labels = list(ids)
  cur = 1
  labels[:1] = [-100]
  for rou in prompt.split('</s>'):
    if rou == '':
      break
    parts = rou.split(SEP)
    if len(parts) != 2:
      break
    round_len = len(tokenize(rou))
    instruction_len = len(tokenize(parts[0] + SEP)) - 2
    labels[cur : cur + instruction_len] = [-100] * instruction_len
    cur += round_len
  labels[cur:] = [-100] * (len(labels) - cur)
  return ids, labels, cur == len(ids)
