"""Facts of the official Uni-MoE code, written here from it as the tests' independent
references: the loss masking of a Vicuna v1 prompt (for data/conversation.py) and the 8-expert
model's expert set (for convert/experts.py and tools/assemble_experts.py)."""

# Uni_MoE_8e's `ori_expert_list`, its items and order as written there: the stage-2 FFN file of
# each of the 8 experts (experts 2/6 and 5/7 share a file).
# fmt: off
EXPERT_SET = ('mlp_audiocap', 'mlp_basev', 'mlp_base', 'mlp_base1', 'mlp_base4',
              'mlp_base7', 'mlp_base', 'mlp_base7')
# fmt: on

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
