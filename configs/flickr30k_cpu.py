"""A Flickr30K-layout data set at CPU size: try real data end to end in minutes before the ViT-B/16 recipe.

The default config's small towers (4 blocks of width 128) on 64 px crops in float32, a WordPiece vocabulary
trained on the training captions (no BERT vocab.txt needed; its real size is logged), the streaming pipeline
of flickr30k.py reading Karpathy's dataset_flickr30k.json and flickr30k-images/ from config.data.manual_dir.
Any folder in that layout works (COCO's: add --config.data.name=coco).
  python -m hivlp_jax.main --config=configs/flickr30k_cpu.py --workdir=runs/flickr30k_cpu \
      --config.data.manual_dir=data/manual/flickr30k
"""

from configs import default
from configs import flickr30k


def get_config():
  config = flickr30k.add_streaming_data_fields(default.get_config())
  config.data.name = 'flickr30k'
  config.data.vocab_file = ''  # Trained on the training captions, in config.data.data_dir.
  config.data.vocab_size = 8000
  config.data.num_workers = 2  # Two cores: decoding shares them with the step.
  config.model.image_size = 64
  config.model.text.max_len = 40  # Flickr30K captions: 12 words on average, 80 at most.
  config.batch_size = 128
  config.num_train_steps = 1500  # About 7 epochs of the 29K training images' captions (one per image a step).
  config.optimizer.warmup_fraction = 0.1
  config.contrastive.image_id_positives = True  # As configs/flickr30k.py.
  config.eval.split = 'test'  # 1,000 images x 5 captions.
  return config
