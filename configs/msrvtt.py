"""Text-to-video retrieval on MSR-VTT (1k-A: 9K training clips x 20 captions, 1K test pairs), ViT-B/16 frames.

The ViT-B/16 + BERT-base towers of base_b16.py see 12 frames per clip at 224 px (uniform segments: a random
frame of each in training, the centres in evaluation), pooled by the temporal Transformer (CLIP4Clip
seqTransf, hivlp_jax/models/video.py). The clips stream through the pipeline (hivlp_jax/data/streaming.py)
and are decoded with PyAV (hivlp_jax/data/videos.py). Put in config.data.manual_dir (docs/data.md):
  videos/all/<video_id>.mp4  (Frozen in Time's MSRVTT.zip), MSRVTT_data.json, MSRVTT_train.9k.csv and
  MSRVTT_JSFUSION_test.csv (CLIP4Clip's msrvtt_data.zip)
and a BERT-base uncased vocab.txt at config.data.vocab_file. Start from an image-text run's newest checkpoint
(its towers; a new optimizer; the temporal Transformer starts fresh; hivlp_jax/init_from_run.py):
  python -m hivlp_jax.main --config=configs/msrvtt.py --workdir=runs/msrvtt \
      --config.init.workdir=runs/web_pretrain [--config.init.step=N] [--config.init.ema=True]
Both runs must use the same vocabulary file.
"""

from configs import flickr30k


def get_config():
  config = flickr30k.get_config()
  config.data.name = 'msrvtt'
  config.data.manual_dir = 'data/manual/msrvtt'
  config.data.captions_per_image = 1  # The JSFusion test pairs: one caption per clip.
  config.data.flip = False  # A mirrored clip moves the other way: captions say "walks to the left".
  config.data.num_workers = 16  # A clip decodes in ~0.3 s on one core (docs/data.md): more threads than for images.
  config.model.video.update(dict(temporal='transformer', num_frames=12, depth=4))  # CLIP4Clip seqTransf: 4 blocks.
  # CLIP4Clip: batch 128, lr 1e-4 for the new parts and 1e-7 for CLIP, 5 epochs of 180K captions when every
  # caption is an example; here one caption per clip per epoch (9K), so 5 epochs of clips = 352 steps.
  config.batch_size = 128
  config.num_train_steps = 2_000  # About 28 epochs of clips, 1.4 of captions.
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 200
  config.checkpoint_every_steps = 500
  config.log_every_steps = 50
  # The 20 captions of a clip are positives of each other (only met at epoch boundaries, or in a queue).
  config.contrastive.image_id_positives = True
  config.eval.split = 'test'  # 1,000 clips x 1 caption.
  config.eval.batch_size = 100  # 100 clips x 12 frames = 1,200 frames per evaluation batch.
  return config
