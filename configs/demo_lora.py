"""LoRA fine-tuning of the trained demo model on two of its clips (README, "Fine-tuning").

  python -m jova_jax.train --config=configs/demo_lora.py --init_from=demo/run \
      --workdir=demo/lora_run

Rank-16 adapters on the joint-attention q/k/v/out and MLPs of both towers; the 4-block base
stays frozen. The training loss in demo/lora_run/metrics.jsonl is the loss on those two clips.
"""
from configs import demo


def get_config():
  c = demo.get_config()
  c.model.lora.update(rank=16, alpha=16.0, dropout=0.0, targets=("qkv", "out", "mlp"))
  c.data.update(max_train_clips=2)
  c.train.update(steps=80, lr=1e-3, warmup_steps=0, schedule="constant", log_every=10)
  c.eval.update(every_steps=0, sample_every_steps=0)
  c.checkpoint.update(every_steps=40, keep=2)
  return c
