"""Every config key of jova-jax, with what it means.

Variants (tiny.py, demo.py, jova_24b.py) start from this and override. Load a variant with
`--config=configs/demo.py` and override any key on the command line, e.g.
`--config.train.steps=100`. Derived quantities (latent shapes, token counts) are computed by
jova_jax.config_lib from these keys, never stored twice. config_lib.RULES holds the range or
the choices of each key below; validate() refuses a value outside them, naming key and value.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- media and codecs
  c.video = ml_collections.ConfigDict(dict(
      codec="pixels",          # 'pixels' (built-in, lossless space-to-depth) | 'wan21' (pretrained)
      fps=8.0,                 # frames per second after resampling
      frames=17,               # pixel frames per clip; 1 + 4k when temporal_factor is 4
      height=64,               # pixel resolution after crop + resize
      width=64,
      temporal_factor=1,       # codec compression in time; the first frame is encoded alone
      spatial_factor=8,        # codec compression in space (H and W)
      latent_channels=192,     # Cv: pixels codec gives 3 * spatial_factor**2; Wan2.1 gives 16
      face_centered_crop=True,  # crop around the detected face before resizing
  ))
  c.audio = ml_collections.ConfigDict(dict(
      codec="mel",             # 'mel' (built-in log-mel) | 'mmaudio16k' | 'mmaudio44k' (pretrained)
      sample_rate=16000,       # Hz, mono
      latent_channels=80,      # Ca: mel bins for 'mel', 20 for mmaudio16k, 40 for mmaudio44k
      latents_per_second=31.25,  # audio latent frame rate (MMAudio 16k: 16000 / 256 / 2)
  ))
  c.text = ml_collections.ConfigDict(dict(
      encoder="minilm",        # 'minilm' (built-in, all-MiniLM-L6-v2) | 't5'
      width=384,               # Dt, the text encoder's output width
      max_length=64,           # text tokens after padding (longer prompts are cut)
  ))
  # Local folder with pretrained weights for the codecs / text encoder ('' = built-in defaults).
  c.weights_dir = ""

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict(dict(
      hidden=128,              # width of every stream
      heads=4,                 # attention heads; head_dim = hidden // heads
      mlp_ratio=4.0,           # FFN width = mlp_ratio * hidden
      dual_blocks=2,           # M: dual-stream blocks (audio / text_a / text_v / video streams)
      single_blocks=2,         # N: single-stream blocks ([audio; text_a] and [text_v; video])
      video_patch=(1, 2, 2),   # patch over (T', H', W') latent grid
      audio_patch=1,           # patch over audio latent frames
      i2v=True,                # add first-frame condition + mask channels to the video input
      i2v_mask_channels=4,     # mask channels (Waver: 16 noisy + 16 condition + 4 mask)
      freq_dim=256,            # sinusoidal width of the sigma embedding
      rope_theta=10000.0,      # RoPE base
      norm_eps=1e-6,
      param_dtype="float32",   # params (and their optimizer state, EMA, checkpoint) in this dtype
      compute_dtype="float32",  # 'bfloat16' on accelerators; float32 on CPU
      remat="none",            # 'none' | 'full' | 'save_dots' | 'offload_dots' (see parallel/remat.py)
      # Blocks per iteration of the scanned block loop; >= the block count unrolls it fully,
      # which on CPU saves the loop's stacking of residuals (docs/performance.md) but
      # compiles every block apart.
      scan_unroll=1,
  ))
  # LoRA (jova_jax/model/lora.py): low-rank adapters on chosen projections, trained on a frozen
  # base loaded with --init_from; checkpoints hold the adapters and a reference to the base.
  c.model.lora = ml_collections.ConfigDict(dict(
      rank=0,                  # adapter rank; 0 = no LoRA
      alpha=16.0,              # the update is (alpha / rank) * x @ A @ B
      dropout=0.0,             # dropout on the adapters' input while training
      # Which projections get adapters: 'qkv' (joint-attention q/k/v of each stream), 'out'
      # (its output projection), 'mlp' (fc1, fc2), 'embedders' (video_in / audio_in patch
      # embedders and the text projections).
      targets=("qkv", "out"),
      towers=("video", "audio"),  # which towers' streams and embedders: 'video', 'audio'
      # Set by the trainer from --init_from: {path, step, fingerprint} of the base the
      # adapters were trained on; the sampler and `jova_jax.lora merge` load it. Not a setting.
      base=None,
  ))

  # ---------------------------------------------------------------- flow matching
  c.flow = ml_collections.ConfigDict(dict(
      density="logit_normal",  # training sigma density: 'logit_normal' | 'uniform' | 'mode'
      logit_mean=0.0,          # logit-normal location
      logit_std=1.0,           # logit-normal scale
      mode_scale=1.29,         # 'mode' density scale (SD3)
      shift=1.0,               # s' = shift*s / (1 + (shift-1)*s); >1 favours noisier sigmas
      prediction="velocity",   # network output: 'velocity' | 'x0' (clean latent; see jova_jax/flow.py)
      x0_min_sigma=0.05,       # 'x0': sigma clamp of the velocity loss (weight 1/max(s, this)^2)
      sigma_data=0.0,          # 'x0': > 0 adds a skip, D = c_skip x_s + c_out F, for data of this std
      p_clean_audio=0.1,       # probability that audio is kept clean (sigma_audio=0): teaches A2V
      p_clean_video=0.1,       # probability that video is kept clean (sigma_video=0): teaches V2A
  ))
  c.loss = ml_collections.ConfigDict(dict(
      lambda_mouth=2.0,        # video weight w = 1 + lambda_mouth * mouth_mask
      lambda_audio=1.0,        # weight of the audio flow-matching loss
  ))

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict(dict(
      source="tfds",           # 'tfds' (prepared dataset, docs/design.md 4) | 'synthetic' (real shapes, noise)
      dir="",                  # prepared dataset directory (tfds.builder_from_directory)
      train_split="train",
      eval_split="eval",
      worker_count=0,          # grain multiprocess workers (0 = in-process)
      worker_buffer_size=2,
      read_threads=4,
      max_train_clips=0,       # train on the first N clips of the train split only (0 = all)
      p_uncond=0.1,            # text replaced by the learned null embedding (CFG)
      p_i2v=0.5,               # first-frame latent given as condition (I2V)
      # Per-channel latent statistics the run normalises with (jova_jax/data/latent_norm.py):
      # set by the trainer from the dataset's metadata.json and saved with the run's config and
      # checkpoints, so the sampler finds them without the dataset. Not a setting: leave None.
      latent_norm=None,
  ))

  # ---------------------------------------------------------------- training
  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=8,            # global batch (all hosts, all devices)
      seed=0,                  # params, noise and data order all derive from (seed, step)
      lr=1e-4,
      schedule="cosine",       # 'cosine' | 'constant' (both after linear warmup)
      warmup_steps=100,
      min_lr_ratio=0.1,        # cosine floor as a fraction of lr
      weight_decay=0.01,       # AdamW; masked off norms, biases and embeddings
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      # AdamW's first moment: 'params' (their dtype) | 'float32' | 'bfloat16'. bfloat16 saves 2
      # bytes a param and a tenth of the update's memory traffic; b1's 10% a step stays far above
      # its rounding (the second moment stays in the params' dtype: b2's 1% would not).
      mu_dtype="params",
      clip_norm=1.0,           # global-norm gradient clipping (0 = off)
      grad_accum=1,            # micro-batches per optimizer step
      ema_decay=0.999,         # EMA of params used by the sampler (0 = off)
      log_every=10,
      max_nonfinite=5,         # stop after this many non-finite steps in a row
      stop_check_every=10,     # steps between the cross-host checks for a signal / preemption
                               # (all hosts stop at the same step; a lone process checks every step)
      # Regex over param paths ('single_blocks/video/fc1/kernel', re.search) of the params that
      # train; the others are frozen (no gradients, no optimizer state, no EMA). '' = all, or
      # with model.lora only the adapters ('.../lora/a', '.../lora/b'), which always train.
      # E.g. '^(audio_in|text_audio|final_audio|sigma_audio)|blocks/(audio|text_a)/' trains the
      # audio tower alone, '^single_blocks/' the single-stream blocks.
      trainable="",
      frozen_dtype="float32",  # dtype frozen params are kept in: 'float32' | 'bfloat16'
  ))
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,           # 0 = no periodic eval
      batches=2,               # batches of the eval split per eval
      sigmas=(0.1, 0.3, 0.5, 0.7, 0.9),  # fixed noise levels for validation loss
      sample_every_steps=0,    # samples while training (<workdir>/samples/<step>/, TensorBoard); 0 = off
      sample_prompts=2,        # held-out examples previewed, each image-to-video and text-only
      sample_steps=0,          # ODE steps of those previews (0 = sample.steps)
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      async_save=True,
  ))

  # ---------------------------------------------------------------- parallelism
  c.mesh = ml_collections.ConfigDict(dict(
      data=1,                  # pure data parallel (params replicated)
      fsdp=-1,                 # data parallel with params/optimizer sharded; -1 = the rest
      context=1,               # video tokens sharded (context parallel attention)
      tensor=1,                # heads / mlp sharded
      dcn_data=1,              # slices / nodes (DCN) the data axis spans: data x dcn_data in all
      dcn_fsdp=1,              # slices / nodes the fsdp axis spans; the sizes above are per slice
  ))
  c.parallel = ml_collections.ConfigDict(dict(
      context_strategy="none",  # 'none' | 'all_gather' | 'ulysses' | 'ring'
      attention_kernel="auto",  # 'auto' | 'xla' | 'chunked' | 'cudnn' | 'splash' | 'cpu'
      attention_chunk=512,      # query/key block for the chunked and ring kernels
  ))

  # ---------------------------------------------------------------- sampling
  c.sample = ml_collections.ConfigDict(dict(
      steps=30,
      solver="euler",           # 'euler' | 'unipc'
      shift=ml_collections.config_dict.placeholder(float),  # None: flow.shift (the training one)
      video_guidance=5.0,
      audio_guidance=4.0,
  ))
  return c
