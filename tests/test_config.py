"""config_lib.validate: the ranges and enums of configs/base.py, refused by key and value
before anything compiles or writes (the command-line side: tests/test_cli.py)."""
import pytest

from jova_jax import codecs, config_lib, text
from jova_jax.model import attention, attention_kernels, jova
from jova_jax.parallel import remat
from jova_jax.sampling import solvers
from tests.conftest import load


@pytest.mark.parametrize("name", ["base", "tiny", "demo", "demo_lora", "jova_24b"])
def test_shipped_configs_are_valid(name):
  config_lib.validate(load(name))


def _names(key):
  assert config_lib.RULES[key][1] == "one of " + ", ".join(config_lib.ENUMS[key])
  return list(config_lib.ENUMS[key])


def test_enums_match_the_modules_that_read_them():
  assert _names("video.codec") == list(codecs.VIDEO_CODECS)
  assert _names("audio.codec") == list(codecs.AUDIO_CODECS)
  assert _names("text.encoder") == list(text.TEXT_ENCODERS)
  assert _names("parallel.context_strategy") == list(attention.STRATEGIES)
  assert _names("parallel.attention_kernel") == list(attention_kernels.KERNELS)
  assert _names("sample.solver") == list(solvers.SOLVERS)
  assert _names("model.compute_dtype") == list(jova.DTYPES)
  for name in _names("model.remat"):
    remat.policy(name)
  with pytest.raises(ValueError):
    remat.policy("sometimes")


@pytest.mark.parametrize("key,value,expected", [
    ("train.batch_size", 0, "train.batch_size=0: expected a number >= 1"),
    ("train.log_every", 0, "train.log_every=0: expected a number >= 1"),
    ("train.lr", float("nan"), "train.lr=nan: expected a number >= 0"),
    ("train.b2", 1.0, "train.b2=1.0: expected a number in [0, 1)"),
    ("flow.p_clean_audio", 1.5, "flow.p_clean_audio=1.5: expected a number in [0, 1]"),
    ("eval.sigmas", (0.1, 2.0), "eval.sigmas=(0.1, 2.0): expected a number in [0, 1]"),
    ("mesh.fsdp", 0, "mesh.fsdp=0: expected a size >= 1, or -1"),
    ("model.remat", "some", "model.remat='some': expected one of none, full"),
    ("text.encoder", "bert", "text.encoder='bert': expected one of minilm, t5"),
])
def test_out_of_range_is_refused_by_key_and_value(key, value, expected):
  config = load("tiny")
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert expected in str(info.value) and "\n" not in str(info.value)


def test_batch_must_split_into_micro_batches():
  config = load("tiny")
  config.train.grad_accum = 3
  with pytest.raises(config_lib.ConfigError, match="not divisible by train.grad_accum=3"):
    config_lib.validate(config)
