"""Pre-training on img2dataset webdataset shards (CC3M, CC12M, LAION, ...), ViT-B/16 + BERT-base towers.

The tars are converted once to ArrayRecord files, which grain reads at random (a global shuffle, an exact
resume); each host reads its own share. Evaluates zero-shot on the COCO 5K test split from the Karpathy
manual dir:
  python -m hivlp_jax.data.convert_shards --shards='data/cc3m/{00000..00331}.tar' --out_dir=data/cc3m_ar
  python -m hivlp_jax.main --config=configs/web_pretrain.py --workdir=runs/web \
      --config.data.shards='data/cc3m_ar/*.array_record'
"""

from configs import base_b16
from configs import flickr30k


def get_config():
  config = flickr30k.add_streaming_data_fields(base_b16.get_config())
  config.data.name = 'webdataset'
  config.data.shards = 'data/web_ar/*.array_record'  # `python -m hivlp_jax.data.convert_shards` writes them.
  config.data.eval_name = 'coco'
  config.data.manual_dir = 'data/manual/coco'  # For the evaluation split.
  config.data.num_workers = 16
  config.data.prefetch = 8
  return config
