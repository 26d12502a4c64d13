"""Small gin helpers the stage files use (gin/stages/)."""

import gin


@gin.configurable
def modality_mixture(
    template: str = 'unimoe_sample_stage2_{modality}', modality: str = gin.REQUIRED
) -> str:
  """The stage-2 mixture of one modality: `template` with `{modality}` filled in.

  Stage 2 is one run per modality; `EXPERT_MODALITY` picks it (gin has no string formatting).
  """
  if '{modality}' not in template:
    raise ValueError(f'modality_mixture.template {template!r} has no {{modality}} field')
  return template.format(modality=modality)
