"""Fine-tuning and evaluation on Flickr30K (Karpathy splits: 29K train images, 1K test), ViT-B/16 224 px.

The ViT-B/16 + BERT-base towers of base_b16.py, fed by the streaming pipeline (hivlp_jax/data/streaming.py).
Put Karpathy's dataset_flickr30k.json and the flickr30k-images/ folder in config.data.manual_dir, and a
BERT-base uncased vocab.txt at config.data.vocab_file:
  python -m hivlp_jax.main --config=configs/flickr30k.py --workdir=runs/flickr30k \
      --config.model.image.init_checkpoint=ViT-B_16.npz
Fine-tuning a pre-trained run (configs/web_pretrain.py with the same vocabulary): start from its newest
checkpoint's parameters with a new optimizer (hivlp_jax/init_from_run.py; arrays of another shape are
fitted or re-initialised and reported):
  python -m hivlp_jax.main --config=configs/flickr30k.py --workdir=runs/flickr30k_ft \
      --config.init.workdir=runs/web_pretrain [--config.init.step=N] [--config.init.ema=True]
"""

from configs import base_b16


def add_streaming_data_fields(config):
  """The config.data fields of the streaming pipeline, shared by the real-data configs."""
  data = config.data
  data.source = 'karpathy'  # 'karpathy': JSON + image folders in manual_dir; 'tfds': a prepared TFDS builder.
  data.manual_dir = 'data/manual/flickr30k'  # Karpathy's split file and the image folder(s).
  # Web shards (name 'webdataset'): ArrayRecord files converted from img2dataset tars by
  # `python -m hivlp_jax.data.convert_shards`: 'dir/*.array_record', a {a..b} range, or comma-separated.
  data.shards = ''
  data.eval_name = ''  # The evaluation data set when it is not data.name (web pre-training: flickr30k or coco).
  data.captions_per_image = 5  # Per evaluation image: the 1K / 5K test protocols use each image's first 5.
  data.crop_scale = (0.5, 1.0)  # Random resized crop: area fraction (Inception/CLIP-style; ALBEF uses 0.5-1).
  data.crop_ratio = (3 / 4, 4 / 3)  # Its aspect ratio range (log-uniform; Inception / torchvision).
  data.flip = True  # Mirror half the images; False where left and right matter (arrows, text, "facing left").
  # The data order (grain): each host takes every process_count-th example and shuffles them globally, a new
  # permutation each epoch (data/streaming.py).
  data.num_workers = 8  # Decode threads per host (per worker process); PIL releases the GIL, so threads scale.
  # grain worker processes (0: threads only). They split the order between them, so a resumed run keeps their
  # number; see benchmarks/input_pipeline.py for when they pay.
  data.worker_processes = 0
  data.prefetch = 4  # Host batches ready ahead of the train step (per worker process).
  data.device_prefetch = 2  # Batches already on the devices (0: host arrays, pmap copies them).
  data.vocab_file = 'data/bert-base-uncased-vocab.txt'  # BERT-base uncased WordPiece vocabulary.
  return config


def get_config():
  config = add_streaming_data_fields(base_b16.get_config())
  config.data.name = 'flickr30k'
  # ALBEF fine-tuning: lr 1e-5, about 10 epochs of captions (145K captions / 512 = 283 steps each).
  config.batch_size = 512
  config.num_train_steps = 3_000
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 300
  config.checkpoint_every_steps = 500
  config.log_every_steps = 50
  # ALBEF: the other captions of an image are positives, not negatives. With the in-batch loss they meet
  # only at epoch boundaries (one caption per image per epoch); with a queue (ALBEF: 65,536, momentum
  # distillation 0.4) in most steps.
  config.contrastive.image_id_positives = True
  config.eval.split = 'test'  # 1,000 images x 5 captions.
  config.eval.batch_size = 500
  return config
