"""ViT-B/16 (224 px) + BERT-base sized towers with 768-d nested heads, for real pre-training.

The data section is still the embedded scenes' (resized to 224 px on device), so the model runs end to
end with nothing to download; flickr30k.py, coco.py and web_pretrain.py build on this config with real
data through the streaming pipeline. Accelerator-sized defaults:
  python -m hivlp_jax.main --config=configs/base_b16.py --workdir=runs/base
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.vocab_size = 30522  # The size of the BERT-base uncased vocabulary.
  config.model.image_size = 224
  config.model.embed_dim = 768
  config.model.nested_dims = (32, 64, 128, 256, 512, 768)
  config.model.dtype = 'bfloat16'
  config.model.image.update(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072))
  # BERT-base: set config.model.text.init_checkpoint to Google's uncased_L-12_H-768_A-12/bert_model.ckpt and
  # config.data.vocab_file to its vocab.txt. BERT has 512 positions; the first 64 are used.
  config.model.text.update(dict(max_len=64, width=768, depth=12, num_heads=12, mlp_dim=3072, architecture='bert'))
  config.loss.dim_weights = (1.0,) * 6
  config.mvlm.min_block_patches = 16  # BEiT, of the 196 patches of a 224 px image.
  config.visual_tokenizer.codebook_size = 8192
  config.batch_size = 4096
  config.num_train_steps = 100_000
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.weight_decay = 0.05
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2_000
  config.eval.batch_size = 1024
  config.eval.two_stage = ((64, 100),)
  config.eval.funnel = ((32, 1000), (128, 100))
  return config
