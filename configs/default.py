"""Default experiment: the embedded procedural scenes, a small two-tower model, CPU-sized.

  python -m hivlp_jax.main --config=configs/default.py --workdir=runs/default
Override any field on the command line, e.g. --config.num_train_steps=500.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'embedded_scenes'
  config.data.builder_config = 'default'  # 'tiny' for tests.
  config.data.data_dir = 'data'  # Generated here on first use.
  config.data.vocab_file = ''  # Empty: train a WordPiece vocabulary on the training captions.
  config.data.vocab_size = 1000
  # Fraction of training images whose captions are swapped for another image's (noisy web pairs).
  config.data.noisy_caption_fraction = 0.0
  # embedded_videos: a clip and its reverse come next to each other in the training order, so they share a
  # batch and each is the other's hard negative: without it a batch almost never holds both, and nothing
  # in the loss asks the model to see frame order.
  config.data.reversed_pairs_in_batch = False

  config.model = ml_collections.ConfigDict()
  config.model.image_size = 32
  config.model.embed_dim = 256
  config.model.nested_dims = (16, 32, 64, 128, 256)
  config.model.dtype = 'float32'
  config.model.remat = 'none'  # Or 'block' (recompute each encoder block, keep its matmuls), 'block_full'.
  config.model.scan_layers = False  # nn.scan over each tower's blocks: compile time flat in depth, params stacked.
  config.model.temperature_init = 0.07
  config.model.temperature_min = 0.001
  config.model.temperature_max = 0.5
  config.model.image = ml_collections.ConfigDict(
      dict(patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512,
           # 'cls': a [CLS] token is pooled (ViT, CLIP); 'gap': the mean of the patch outputs, no [CLS] (SigLIP),
           # which keeps the token count even (196 at 224 / 16 px) for GPU flash attention.
           pool='cls',
           init_checkpoint=''))  # A public ViT .npz or a Hugging Face ViT folder to start from (models/pretrained.py).
  config.model.text = ml_collections.ConfigDict(
      dict(max_len=32, width=128, depth=4, num_heads=4, mlp_dim=512,
           architecture='pre_ln',  # Or 'bert': post-LN blocks that a BERT checkpoint fits (models/bert.py).
           init_checkpoint=''))  # BERT to start from: TF bert_model.ckpt or a Hugging Face folder; needs 'bert'.
  # Clips [B, T, H, W, 3] in place of images: the image tower embeds every frame, then a temporal aggregator
  # pools the frames before the image head (models/video.py). Unused by image data.
  config.model.video = ml_collections.ConfigDict(dict(
      temporal='mean',  # Mean of the frames (CLIP4Clip meanP), or 'transformer' (seqTransf: sees frame order).
      depth=2,  # Blocks of the temporal Transformer.
      num_heads=0,  # Its attention heads; 0: the image tower's.
      num_frames=8,  # Frames per clip: the temporal Transformer learns this many frame positions.
      patch_grid=0,  # g > 0: the temporal Transformer also sees each frame's patches pooled to g x g cells.
      frame_differences=False))  # The Transformer also sees the T - 1 frame differences (motion direction).

  config.loss = ml_collections.ConfigDict()
  config.loss.dim_weights = (1.0, 1.0, 1.0, 1.0, 1.0)  # One per nested dim.
  config.loss.kind = 'softmax'  # Or 'sigmoid': SigLIP's pairwise loss, in-batch only (queue_size must be 0).

  # Momentum contrast (MoCo/ALBEF instance level) and COTS task-level alignment. queue_size = 0 trains with
  # in-batch negatives only and leaves every other field here unused.
  config.contrastive = ml_collections.ConfigDict()
  # Pairs in each of the image and text queues of momentum embeddings (sharded over the devices); a
  # multiple of batch_size. MoCo and ALBEF use 65,536; COTS does not say.
  config.contrastive.queue_size = 0
  config.contrastive.momentum = 0.995  # EMA of the momentum towers (ALBEF; MoCo v2 uses 0.999).
  config.contrastive.momentum_schedule = 'constant'  # Or 'cosine': raised to 1 at num_train_steps (MoCo v3).
  # Momentum distillation (ALBEF): weight of the momentum towers' soft targets, ramped up linearly over
  # distill_warmup_steps (ALBEF: 0.4 over the first epoch). 0: hard targets only.
  config.contrastive.distill_weight = 0.0
  config.contrastive.distill_warmup_steps = 0
  # Task-level alignment (COTS): weight of the KL between the image-to-text and text-to-image distributions
  # over [the pair, the queue]. 0: off. Direction: 'i2t_t2i' = KL(p_i2t || p_t2i), 't2i_i2t', or 'symmetric'
  # (their mean); 'target' stops the gradient through the first argument of each KL, 'none' does not.
  config.contrastive.kl_weight = 0.0
  config.contrastive.kl_direction = 'symmetric'
  config.contrastive.kl_stop_gradient = 'none'
  # Adaptive momentum filter (COTS): pairs whose momentum-tower similarity is below mean - filter_k * std
  # (running statistics, EMA with filter_stats_momentum) are left out of the losses and of the queues.
  config.contrastive.filter_noisy_pairs = False
  config.contrastive.filter_k = 2.0
  config.contrastive.filter_stats_momentum = 0.99
  # Steps before the filter drops anything (the momentum towers start random); its statistics still accumulate.
  config.contrastive.filter_warmup_steps = 100
  # Image-id positives (ALBEF's retrieval fine-tuning): every pair of the batch and the queue that shows the
  # same image is a positive, not only the pair itself, so the other captions of an image are never pushed
  # away from it. Needs data with image ids (Flickr30K, COCO, the embedded scenes); off for web pairs.
  config.contrastive.image_id_positives = False

  # Token-level interaction (COTS masked vision-language modeling). Each weight 0: that loss is off.
  config.mvlm = ml_collections.ConfigDict()
  config.mvlm.mlm_weight = 0.0  # Masked language modeling, predicted with the paired image's embedding.
  config.mvlm.mvm_weight = 0.0  # Masked vision modeling of visual-token ids, with the paired text's embedding.
  config.mvlm.text_mask_ratio = 0.15  # BERT: of the chosen tokens 80% become [MASK], 10% random, 10% kept.
  config.mvlm.image_mask_ratio = 0.4  # BEiT block-wise masking of the patch grid.
  config.mvlm.min_block_patches = 2  # BEiT: 16 (of 196 patches); the default grid has only 16 patches.

  # Discrete VAE visual tokenizer, trained as its own stage (main --mode=tokenizer); masked vision modeling
  # predicts its codes. The codebook must match the ViT patch grid: one code per patch.
  config.visual_tokenizer = ml_collections.ConfigDict()
  config.visual_tokenizer.workdir = ''  # The tokenizer stage's workdir (checkpoint and cached codes).
  config.visual_tokenizer.codes_file = ''  # Or codes made elsewhere: .npy int [num_train_images, grid, grid].
  config.visual_tokenizer.codebook_size = 512  # BEiT / DALL-E: 8,192 on real images.
  config.visual_tokenizer.hidden_dim = 64  # Conv channels at the code grid, halved per 2x resolution (min 16).
  config.visual_tokenizer.code_dim = 64  # Width of a codebook entry.
  config.visual_tokenizer.num_res_blocks = 1  # Residual blocks at the code grid in the encoder and the decoder.
  config.visual_tokenizer.batch_size = 128  # Global, over all devices and hosts.
  config.visual_tokenizer.num_train_steps = 500  # About 1.6 epochs of the 40k default training images.
  config.visual_tokenizer.warmup_steps = 50
  config.visual_tokenizer.learning_rate = 2e-3  # AdamW peak, then cosine decay to 5% of it.
  config.visual_tokenizer.weight_decay = 1e-4  # On kernels only.
  config.visual_tokenizer.temperature_start = 1.0  # Gumbel-softmax temperature, annealed exponentially (DALL-E:
  config.visual_tokenizer.temperature_end = 0.0625  # 1 -> 1/16) over num_train_steps.
  # Weight of KL(q(code | patch) || uniform) per position against pixel MSE. Measured here: 1e-3 and 1e-2 kept
  # the posterior uniform (no code carried information) through 200 steps, so it is off by default.
  config.visual_tokenizer.kl_weight = 0.0
  config.visual_tokenizer.eval_split = 'validation'  # Reconstruction and code usage in metrics.json.
  config.visual_tokenizer.log_every_steps = 50
  config.visual_tokenizer.checkpoint_every_steps = 250

  config.batch_size = 256  # Global, over all devices and hosts.
  # Micro-batches per step: each device embeds its rows in this many slices, the loss sees every negative of
  # the global batch, and the gradient is pulled back slice by slice (GradCache). Memory for a batch that
  # does not fit; costs one extra forward pass.
  config.accumulation_steps = 1
  config.num_train_steps = 700
  # A wall-clock budget in minutes (0: none): training stops at the first step that ends after it (setup
  # included), checkpoints and evaluates that step; running again continues training. Leave time to evaluate.
  config.train_minutes = 0.0
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.warmup_fraction = 0.0  # > 0: the warm-up is this share of num_train_steps (replaces warmup_steps).
  config.optimizer.end_learning_rate_fraction = 0.01
  config.optimizer.weight_decay = 0.05
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.98
  config.optimizer.grad_clip_norm = 1.0

  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.max_checkpoints_to_keep = 2
  # A step whose loss is not finite is skipped; this many in a row stop the run.
  config.max_consecutive_nonfinite_steps = 10

  # Start from another run's checkpoint (pre-train, then fine-tune; hivlp_jax/init_from_run.py): its workdir
  # ('' : from scratch), its step (0: the newest), whether the momentum towers start from its own, and the
  # top-level parameter groups to copy: () all of them; ('image_tower', 'image_head') leaves the text tower
  # as initialised, so the two runs' vocabularies may differ.
  config.init = ml_collections.ConfigDict(dict(workdir='', step=0, ema=False, parts=()))

  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'test'
  # The sets --mode=evaluate runs, each on eval.split with every mode below, into
  # WORKDIR/metrics/<set>/<split>/step_<N>.json: names from 'embedded_scenes', 'flickr30k', 'coco'.
  # (): the run's own set (data.eval_name, else data.name), the one training evaluates at its end.
  config.eval.datasets = ()
  # Where each set other than the run's own is read (the run's own is read where config.data says).
  # embedded_scenes is generated there on first use; flickr30k and coco as config.data's fields of the
  # same names say (configs/flickr30k.py).
  config.eval.locations = ml_collections.ConfigDict(dict(
      embedded_scenes=dict(builder_config='default', data_dir='data'),
      flickr30k=dict(source='karpathy', manual_dir='data/manual/flickr30k', data_dir='data'),
      coco=dict(source='karpathy', manual_dir='data/manual/coco', data_dir='data')))
  config.eval.batch_size = 500
  config.eval.ks = (1, 5, 10)
  # Coarse-to-fine modes besides exact search at every nested dim: ScaNN over the coarse prefix gives a
  # shortlist, exact full-dim similarity re-ranks it. (coarse_dim, shortlist) pairs; funnel stages.
  config.eval.two_stage = ((32, 50),)
  config.eval.funnel = ((16, 200), (64, 50))
  # How two_stage runs: 'auto' (ScaNN's truncate mode where it builds a tree, else an exact coarse shortlist
  # re-ranked in numpy), 'rerank' or 'truncate'; see coarse_to_fine.TwoStageSearch.
  config.eval.two_stage_backend = 'auto'
  # How ScaNN builds its searchers (retrieval.ScannSettings); 0: chosen from the gallery size.
  config.eval.scann = ml_collections.ConfigDict()
  config.eval.scann.brute_force_below = 20_000  # Smaller galleries are scored exhaustively (exact).
  config.eval.scann.num_leaves = 0  # Tree partitions; 0: sqrt(G).
  config.eval.scann.leaves_to_search = 0  # Per query; 0: max(10% of the leaves, enough for 20 * k items).
  config.eval.scann.training_sample_size = 0  # 0: min(G, 250,000).
  config.eval.scann.reorder = 0  # Hashed candidates re-scored exactly (rerank backend); 0: max(200, 2 * k).
  config.eval.scann.threads = 0  # Build and batched-search threads; 0: every core.
  # > 0: the evaluator's coarse-to-fine modes (tuned on 1,000 of each direction's queries, against exact search:
  # no labels) and the query tool's saved indexes (on held-out queries; recorded in the index manifest) run at
  # the cheapest leaves-to-search and shortlist that reach this recall@10 of exact search (hivlp_jax/tuning.py).
  # 0: the fixed settings above.
  config.eval.scann.target_recall = 0.0
  # Speed of every mode both ways, into metrics.json and TensorBoard: p50/p99 latency over this many single
  # queries, batched queries/s, shortlist recall against the exact full-dim top-10. 0: recall only.
  config.eval.latency_queries = 100
  return config
