"""Text-to-video retrieval on the embedded clips (data/moving_scenes.py): the video main job, CPU-sized.

  launch/local.sh configs/video_default.py runs/video
Clips (4 of their 8 frames, 32x32) go through the image tower frame by frame, the temporal Transformer pools the
frames (config.model.video, models/video.py) and the image head projects the clip; every loss, queue and
nested dim is the image path's. Metrics are named as video retrieval names them: 't2v_*' and 'v2t_*', with
median (MdR) and mean (MnR) ranks. `configs/default.py` documents every field.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'embedded_videos'
  config.data.builder_config = 'default'  # 20k train, 1k validation, 2k test clips; 'tiny' for tests.
  config.data.reversed_pairs_in_batch = True  # Each clip's reverse in its batch: frame order must be seen.
  config.model.video.temporal = 'transformer'  # Frame order matters: half the test clips come reversed too.
  # The 3 differences of consecutive frames go through the image tower too: the direction of motion is then in
  # one image. Without them no run learned direction (order of motion-only pairs 0.50-0.56, also at 3,000
  # steps); with them 0.98 at 1,000 steps (docs/results.md). They cost about 1.25x the step time.
  # 4 of the 8 stored frames: a random one of each pair in training (a cheap temporal augmentation), frames
  # 1, 3, 5, 7 in evaluation. Half the image-tower work of 8 frames, so twice the steps in the same time:
  # 8 frames x 600 steps reached t2v / v2t R@10 0.793 / 0.605, 4 frames x 1,000 steps 0.930 / 0.760, each in
  # about 12 minutes on 2 cores (docs/results.md).
  config.model.video.num_frames = 4
  config.model.video.frame_differences = True
  config.batch_size = 128
  config.num_train_steps = 1000  # 800 read order 0.895 (docs/results.md); 1,000 fit the 15 minutes too.
  config.optimizer.warmup_steps = 100
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  config.eval.batch_size = 250
  return config
