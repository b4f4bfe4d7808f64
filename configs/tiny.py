"""A tiny model on the tiny embedded data set: a smoke run of the whole job in about a minute on CPU.

  python -m hivlp_jax.main --config=configs/tiny.py --workdir=runs/tiny
The tests train this config.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.builder_config = 'tiny'  # 512 train, 64 validation, 64 test images.
  config.model.embed_dim = 64
  config.model.nested_dims = (8, 16, 32, 64)
  config.loss.dim_weights = (1.0, 1.0, 1.0, 1.0)
  config.model.image.update(dict(width=64, depth=1, num_heads=2, mlp_dim=128))  # Depth 1: XLA compiles
  config.model.text.update(dict(width=64, depth=1, num_heads=2, mlp_dim=128))  # twice as fast (the tests).
  config.batch_size = 32
  config.num_train_steps = 6
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.eval.batch_size = 64
  config.visual_tokenizer.update(dict(codebook_size=64, batch_size=32, num_train_steps=200, warmup_steps=10,
                                      learning_rate=3e-3, log_every_steps=100, checkpoint_every_steps=100))
  return config
