"""The default model on the hard embedded scenes: a benchmark with headroom for ablations.

  python -m hivlp_jax.main --config=configs/hard.py --workdir=runs/hard
The 'hard' builder config (data/hard_scenes.py; docs/data.md) draws 2 to 5 objects with clutter, in
families of 16 scenes that differ from their base by one attribute, one swap of two objects' cells or one
object more or fewer. The model, batch and schedule are the default's; only the caption length and the
number of steps differ.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.builder_config = 'hard'
  # Captions name up to 5 objects: at most 50 words, each one token of the trained vocabulary, + [CLS] [SEP].
  config.model.text.max_len = 56
  config.num_train_steps = 400  # About 10 minutes of training on 2 CPU cores (docs/results.md).
  config.checkpoint_every_steps = 200
  return config
