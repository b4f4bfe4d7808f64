"""Fine-tuning and evaluation on COCO (Karpathy splits: train + restval 113K images, 5K test), ViT-B/16.

The recipe of flickr30k.py on COCO. Two sources:
- 'karpathy' (default): dataset_coco.json and the train2014/ and val2014/ folders in config.data.manual_dir.
- 'tfds': TFDS's coco_captions/2014 builder (same Karpathy splits), built once in config.data.data_dir with
  `tfds build coco_captions --data_dir=data` (downloads about 19 GB).
  python -m hivlp_jax.main --config=configs/coco.py --workdir=runs/coco
From a pre-trained run, as in flickr30k.py: add --config.init.workdir=runs/web_pretrain.
"""

from configs import flickr30k


def get_config():
  config = flickr30k.get_config()
  config.data.name = 'coco'
  config.data.manual_dir = 'data/manual/coco'
  # About 5 epochs of captions (567K captions / 512 = 1,107 steps each).
  config.num_train_steps = 6_000
  config.optimizer.warmup_steps = 500
  config.checkpoint_every_steps = 1_000
  config.eval.split = 'test'  # 5,000 images x 5 captions (the 5K test).
  config.eval.batch_size = 1000
  return config
