"""The results of `python -m unimoe_jax.progressive`: tables, the modality bias, pictures.

Scores. Each evaluation task's metric is set against its chance level `c` (the best constant
answer, measured on the data: sample_data_info.json) as

  margin      = metric - c          (accuracy)       c - WER          (WER: lower is better)
  normalised  = margin / (1 - c)                     margin / c

so 0 is chance and 1 is perfect whatever the task's chance level. A modality's normalised score
is the mean over its tasks (the sample data: its multiple-choice and open task).

Bias across modalities (the paper's "performance bias"): the spread of the four modalities'
normalised scores, reported as max - min (the headline number) and as the population standard
deviation. Lower is less biased.

Pictures (matplotlib, an optional dependency: `pip install -e .[plots]`; imported only here):
loss curves of every stage, a routing heatmap per modality (MoE layers x experts, media soft
tokens and text tokens side by side), and the dense-vs-MoE bars per task with chance marked.
"""

import importlib.util
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from unimoe_jax.modalities import MODALITIES

MARGIN = 0.10  # "beats chance": by at least this much (WER: this much below).


def modality_of(task: str) -> Optional[str]:
  """The modality a task name mentions ('unimoe_sample_eval_image_mc' -> 'image'), or None."""
  parts = task.split('_')
  found = [m for m in MODALITIES if m in parts]
  return found[0] if len(found) == 1 else None


def normalised(value: float, chance: float, lower_is_better: bool) -> float:
  """0 at chance, 1 at a perfect score (see the module docstring). NaN when chance is
  already perfect (nothing to normalise by)."""
  if lower_is_better:
    return (chance - value) / chance if chance > 0 else math.nan
  return (value - chance) / (1.0 - chance) if chance < 1 else math.nan


def margin(row: Mapping[str, float]) -> float:
  return row['chance'] - row['value'] if row['lower_is_better'] else row['value'] - row['chance']


def modality_scores(rows: Sequence[Mapping]) -> Dict[str, float]:
  """{modality: mean normalised score of its tasks}, for the modalities the rows cover."""
  by_modality: Dict[str, List[float]] = {}
  for r in rows:
    m = modality_of(r['task'])
    if m is not None:
      by_modality.setdefault(m, []).append(
          normalised(r['value'], r['chance'], r['lower_is_better'])
      )
  return {m: float(np.mean(v)) for m, v in by_modality.items()}


def bias(scores: Mapping[str, float]) -> Tuple[float, float]:
  """(max - min, population standard deviation) of the modalities' normalised scores."""
  values = np.array(list(scores.values()), np.float64)
  if values.size == 0:
    return math.nan, math.nan
  return float(values.max() - values.min()), float(values.std())


def _verdict(row) -> str:
  return 'yes' if margin(row) >= MARGIN else 'NO'


def format_table(rows: Sequence[Mapping], dense_rows: Optional[Sequence[Mapping]] = None) -> str:
  """Markdown: per task the metric, examples, chance, the MoE model's value and margin (and
  the dense model's, with `dense_rows`), then the per-modality normalised scores and the bias."""
  dense = {r['task']: r for r in dense_rows or ()}
  head = ['task', 'metric', 'examples', 'chance', 'MoE', 'MoE margin']
  if dense:
    head += ['dense', 'dense margin']
  head.append(f'MoE beats chance by {MARGIN:.2f}')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [
        r['task'],
        r['metric'] + (' (lower is better)' if r['lower_is_better'] else ''),
        str(r.get('examples', '?')),
        f"{r['chance']:.3f}",
        f"{r['value']:.3f}",
        f'{margin(r):+.3f}',
    ]
    if dense:
      d = dense.get(r['task'])
      cells += [f"{d['value']:.3f}", f'{margin(d):+.3f}'] if d else ['-', '-']
    cells.append(_verdict(r))
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', _scores_table(rows, dense_rows)]
  return '\n'.join(lines)


def _scores_table(rows, dense_rows) -> str:
  models = [('MoE', modality_scores(rows))]
  if dense_rows:
    models.append(('dense', modality_scores(dense_rows)))
  present = [m for m in MODALITIES if m in models[0][1]]
  head = ['normalised score (0 chance, 1 perfect)'] + present + ['bias: max - min', 'bias: std']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, scores in models:
    spread, std = bias(scores)
    lines.append(
        '| '
        + ' | '.join(
            [name]
            + [f'{scores.get(m, math.nan):.3f}' for m in present]
            + [f'{spread:.3f}', f'{std:.3f}']
        )
        + ' |'
    )
  return '\n'.join(lines)


# ---- pictures -----------------------------------------------------------------------------


def check_plotting() -> None:
  """SystemExit with the install command when matplotlib is missing."""
  if importlib.util.find_spec('matplotlib') is None:
    raise SystemExit(
        'the pictures need matplotlib: pip install -e ".[plots]" (or pass ' '--no_pictures)'
    )


def _pyplot():
  check_plotting()
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def _save(fig, path: str) -> np.ndarray:
  """Writes the PNG; returns the RGB image `[height, width, 3]` uint8 (for TensorBoard)."""
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _pyplot().close(fig)
  return image


def plot_losses(histories: Mapping[str, Sequence[Tuple[int, float]]], path: str) -> np.ndarray:
  """One panel per stage: training loss against step."""
  plt = _pyplot()
  names = list(histories)
  cols = min(4, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    steps, losses = zip(*histories[name]) if histories[name] else ((), ())
    ax.plot(steps, losses, marker='.', linewidth=1)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('step')
    ax.set_ylabel('training loss')
  for ax in list(axes.flat)[len(names) :]:
    ax.axis('off')
  fig.tight_layout()
  return _save(fig, path)


def plot_routing(
    modality: str,
    fractions: Mapping[str, np.ndarray],
    layer_names: Sequence[str],
    path: str,
    expert_names: Optional[Sequence[str]] = None,
) -> np.ndarray:
  """Heatmaps (layers x experts) of the fraction of routing choices per expert, one panel per
  token group ('media', 'text'); `expert_names` label the experts (e.g. the modality each was
  trained on in stage 2)."""
  plt = _pyplot()
  groups = [g for g in ('media', 'text') if g in fractions]
  fig, axes = plt.subplots(
      1, len(groups), figsize=(4.2 * len(groups), 0.5 * len(layer_names) + 2.0), squeeze=False
  )
  for ax, group in zip(axes[0], groups):
    value = np.asarray(fractions[group], np.float64)
    image = ax.imshow(value, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto')
    ax.set_title(f'{modality}: {group} tokens', fontsize=9)
    ax.set_xlabel('expert (trained in stage 2 on)' if expert_names else 'expert')
    ax.set_ylabel('MoE layer')
    ax.set_xticks(
        range(value.shape[1]),
        labels=[
            f'{e}\n{expert_names[e]}' if expert_names else str(e) for e in range(value.shape[1])
        ],
        fontsize=8,
    )
    ax.set_yticks(range(value.shape[0]), labels=list(layer_names))
    for (i, j), x in np.ndenumerate(value):
      ax.text(
          j,
          i,
          '-' if np.isnan(x) else f'{x:.2f}',
          ha='center',
          va='center',
          fontsize=7,
          color='white' if x < 0.5 else 'black',
      )
    fig.colorbar(image, ax=ax, label='fraction of routing choices')
  fig.tight_layout()
  return _save(fig, path)


def plot_comparison(
    rows: Sequence[Mapping], dense_rows: Optional[Sequence[Mapping]], path: str
) -> np.ndarray:
  """Bars per task: the MoE model's metric (and the dense model's), a black tick at chance."""
  plt = _pyplot()
  dense = {r['task']: r for r in dense_rows or ()}
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 3.8))
  x = np.arange(len(rows))
  width = 0.38 if dense else 0.6
  ax.bar(x - (width / 2 if dense else 0), [r['value'] for r in rows], width, label='MoE')
  if dense:
    ax.bar(
        x + width / 2,
        [dense[r['task']]['value'] if r['task'] in dense else np.nan for r in rows],
        width,
        label='dense',
    )
  ax.scatter(
      x, [r['chance'] for r in rows], marker='_', s=900, color='black', zorder=3, label='chance'
  )
  ax.set_xticks(
      x,
      labels=[
          r['task'].replace('unimoe_sample_eval_', '')
          + ('\n(WER, lower\nis better)' if r['lower_is_better'] else '')
          for r in rows
      ],
      fontsize=8,
  )
  ax.set_ylabel('metric (accuracy or WER)')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)
  ax.set_title('evaluation tasks: ' + ('dense vs MoE' if dense else 'MoE') + ', chance marked')
  fig.tight_layout()
  return _save(fig, path)


def write_pictures(
    work: str, histories, routing_by_modality, layer_names, rows, dense_rows=None, expert_names=None
) -> Dict[str, str]:
  """All PNGs into `work` and the same images to TensorBoard (`work/pictures`); returns
  {title: file name}."""
  images, files = {}, {}
  files['training loss'] = 'losses.png'
  images['losses'] = plot_losses(histories, os.path.join(work, files['training loss']))
  for modality, fractions in routing_by_modality.items():
    name = f'routing_{modality}.png'
    files[f'routing: {modality}'] = name
    images[f'routing_{modality}'] = plot_routing(
        modality, fractions, layer_names, os.path.join(work, name), expert_names
    )
  files['dense vs MoE' if dense_rows else 'MoE vs chance'] = 'comparison.png'
  images['comparison'] = plot_comparison(rows, dense_rows, os.path.join(work, 'comparison.png'))
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  writer = metric_writers.create_default_writer(os.path.join(work, 'pictures'))
  writer.write_images(0, {k: v[None] for k, v in images.items()})
  writer.flush()
  return files


# ----------------------------------------------------------------------------------------------
# The results files and the chance levels they are read against.


def per_question_constant(level: dict) -> float:
  """Accuracy of the best constant answer for each question type: the model sees the question,
  so answering 'one' to every count question and 'red' to every colour question is chance too."""
  categories = level.get('per_category', {})
  total = sum(c.get('num_examples', 0) for c in categories.values())
  if not total:
    return 0.0
  return (
      sum(c['num_examples'] * c.get('best_constant_accuracy', 0.0) for c in categories.values())
      / total
  )


def chance_table(
    results: Dict[str, Dict[str, float]], info: Optional[dict], split: str = 'validation'
) -> List[dict]:
  """One row per evaluation task with an accuracy, exact-match or WER metric: the metric, its
  value, the chance level (from the sample data's info; without one, 0 for accuracy and 1 for
  WER) and the number of examples it rests on."""
  chance = (info or {}).get('splits', {}).get(split, {}).get('chance', {})
  rows = []
  for task, metrics in sorted(results.items()):
    level = chance.get(task.replace('unimoe_sample_', ''), {})
    examples = int(metrics['num_examples']) if 'num_examples' in metrics else '?'
    if 'wer' in metrics:
      rows.append(
          dict(
              task=task,
              metric='WER',
              value=metrics['wer'],
              examples=examples,
              chance=level.get('best_constant_wer', 1.0),
              lower_is_better=True,
          )
      )
    elif 'accuracy' in metrics or 'exact_match' in metrics:
      name = 'accuracy' if 'accuracy' in metrics else 'exact_match'
      levels = [
          level.get('best_constant_accuracy', 0.0),
          level.get('uniform_guess_accuracy', 0.0),
          per_question_constant(level),
      ]
      rows.append(
          dict(
              task=task,
              metric=name,
              value=metrics[name] / 100.0,
              examples=examples,
              chance=max(levels),
              lower_is_better=False,
          )
      )
    else:
      logging.warning(
          'results table: %s has no accuracy, exact_match or wer metric (%s); left ' 'out',
          task,
          sorted(metrics),
      )
  return rows


def routing_by_modality(routing: Dict[str, Dict[str, 'object']]) -> Dict[str, Dict]:
  """{modality: {group: fractions [layers, experts]}}: the counts of the modality's tasks
  summed, then normalised."""
  from unimoe_jax.training import routing_report  # pylint: disable=g-import-not-at-top

  summed: Dict[str, Dict] = {}
  for task, counts in routing.items():
    modality = modality_of(task)
    if modality is not None:
      routing_report.add_counts(summed.setdefault(modality, {}), counts)
  return {m: routing_report.fractions(summed[m]) for m in MODALITIES if m in summed}


def write_results(
    work: str, rows, dense_rows, histories, routing, layer_names, pictures: bool, elapsed: float
) -> str:
  """results.md (the tables, the routing fractions and the pictures) and results.json."""
  table = format_table(rows, dense_rows)
  by_modality = routing_by_modality(routing) if routing else {}
  lines = [f'# Uni-MoE progressive training: {elapsed:.0f} s', '', table, '']
  experts = ', '.join(f'{e} = {m}' for e, m in enumerate(MODALITIES))
  if by_modality:
    lines += [
        "## Routing (MoE model): fraction of each modality's routing choices per expert",
        '',
        f'Experts by the modality stage 2 trained them on: {experts}.',
        '',
    ]
    for modality, fractions in by_modality.items():
      for group, value in fractions.items():
        lines.append(
            f'- {modality}, {group} tokens: '
            + '; '.join(
                f'{name} ' + ' '.join('-' if x != x else f'{x:.2f}' for x in row)
                for name, row in zip(layer_names, value)
            )
        )
    lines.append('')
  if pictures:
    # The experts in the order stage 2 trained them (experts_lib.assemble_experts).
    files = write_pictures(
        work, histories, by_modality, layer_names, rows, dense_rows, expert_names=list(MODALITIES)
    )
    lines += ['## Pictures', ''] + [f'![{title}]({name})' for title, name in files.items()]
  with open(os.path.join(work, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(work, 'results.json'), 'w') as f:
    json.dump(
        {
            'moe': rows,
            'dense': dense_rows,
            'routing': {m: {g: v.tolist() for g, v in fr.items()} for m, fr in by_modality.items()},
        },
        f,
        indent=1,
    )
  return table
