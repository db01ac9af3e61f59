"""CPU demo: 32x32 talking clips at 8 fps, 17 frames (2.1 s); faces whose mouths move with
their speech, closing where it pauses, after about ten minutes of training on 2 cores.

What the demo's learning rests on (measured, `make demo`'s summary; see README):
- The pixels codec (spatial factor 4) and a (1,2,2) patch give tokens of 192 values, as many as
  the model is wide. A velocity-predicting model would have to reproduce the noise through
  that width and samples patch noise; predicting the clean latent (flow.prediction='x0')
  samples faces.
- Training and sampling share flow.shift=3 (the sampler spends its first steps at high noise:
  the model must have trained there).
- Compute and step size limit it from there: at lr 1e-3, 600 steps at width 192 gave no face
  that dlib finds in half the frames, 1000 steps 6 of 8, and 600 steps at width 256 (the same
  FLOPs as 1000 at 192) 5 of 8; lr 2e-3 gave 8 of 8 and lips above the shuffled-audio
  control (0.62 vs 0.56). An 800-step run at lr 2e-3 found 7 of 8 faces but its lips fell
  below the control (0.48 vs 0.52): sync needs the last 200 steps.
- Lip sync is measurable because each corpus clip pauses once mid-sentence at a place of its
  own (data_prep/make_demo_corpus.py): the generated mouths close at their own audio's pause,
  and the peak correlation beats the shuffled-audio control by 3.8-5.2 standard errors. Before
  the pauses every clip was silence-speech-silence and the margin was within noise.
- Guidance 1 (no CFG): with so short a training, guidance 1.5-5 oversaturates the x0 estimate
  and dlib finds fewer faces.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.video.update(frames=17, fps=8.0, height=32, width=32, spatial_factor=4, latent_channels=48)
  c.text.update(max_length=32)
  # Unrolled, the 2+2 blocks skip the scan's residual bookkeeping (docs/performance.md: -12%).
  c.model.update(hidden=192, heads=4, mlp_ratio=4.0, dual_blocks=2, single_blocks=2, scan_unroll=2)
  c.flow.update(prediction="x0", shift=3.0)
  c.data.update(dir="demo/dataset")
  # A bfloat16 first moment: a tenth less of the update's memory traffic (docs/performance.md,
  # sixteenth round); the demo learns as with float32.
  c.train.update(steps=1000, batch_size=8, lr=2e-3, warmup_steps=50, log_every=10,
                 mu_dtype="bfloat16")
  c.eval.update(every_steps=250, batches=1, sample_every_steps=500, sample_prompts=2)
  c.checkpoint.update(every_steps=250, keep=2)
  c.sample.update(steps=20, video_guidance=1.0, audio_guidance=1.0)
  return c
