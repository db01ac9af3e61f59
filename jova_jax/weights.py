"""Reading pretrained weight files, for every port (codecs and text encoders).

read_tensors: one state dict from .safetensors (numpy, no torch) or .pth/.pt (torch.load with
weights_only=True, only when torch is installed). TensorChecker: takes tensors by name and
shape and refuses a bad file once, listing every missing or misshapen tensor.
SafetensorsFolder: a Hugging Face folder (one file or sharded with an index), read one tensor
at a time so a 10 GB encoder is never held twice.
"""
from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

# Hugging Face's names: one file, or an index naming the shards of each tensor.
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def read_tensors(path: str, what: str) -> dict[str, np.ndarray]:
  """A state dict from .safetensors (numpy loader) or .pth/.pt (torch.load weights_only=True,
  only when torch is installed). A {'generator': state_dict} checkpoint is unwrapped."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    return safetensors.numpy.load_file(path)
  if suffix not in (".pth", ".pt", ".ckpt"):
    raise ValueError(f"{what}: unknown weights format {path} (expected .safetensors, .pth or .pt)")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{what}: reading {path} needs torch (`pip install torch`), or convert it "
                      f"to .safetensors with the same tensor names") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "generator" in state:
    state = state["generator"]
  if not isinstance(state, dict):
    raise ValueError(f"{what}: {path} does not hold a state dict (found {type(state).__name__})")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


class TensorChecker:
  """Takes tensors by name and expected shape, collecting every missing or misshapen one, so a
  bad file is refused once with the full list."""

  def __init__(self, tensors: dict, path: str, what: str):
    self.tensors, self.path, self.what, self.errors = tensors, path, what, []

  def get(self, name: str, shape: tuple) -> np.ndarray:
    shape = tuple(shape)
    if name not in self.tensors:
      self.errors.append(f"tensor {name!r} is missing (expected shape {shape})")
      return np.zeros(shape, np.float32)
    value = np.asarray(self.tensors[name], np.float32)
    if value.shape != shape:
      self.errors.append(f"tensor {name!r} has shape {value.shape}, expected {shape}")
      return np.zeros(shape, np.float32)
    return value

  def weight_normed(self, prefix: str, shape: tuple) -> np.ndarray:
    """`prefix.weight`, folded from whichever weight-norm layout the file uses."""
    g_shape = (shape[0],) + (1,) * (len(shape) - 1)
    for g_name, v_name in ((".weight_g", ".weight_v"),
                           (".parametrizations.weight.original0",
                            ".parametrizations.weight.original1")):
      if prefix + v_name in self.tensors:
        g, v = self.get(prefix + g_name, g_shape), self.get(prefix + v_name, shape)
        norm = np.sqrt(np.square(v).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
        return (g * v / np.where(norm == 0, 1.0, norm)).astype(np.float32)
    if prefix + ".weight" not in self.tensors:
      self.errors.append(f"tensor {prefix + '.weight_v'!r} (with {prefix + '.weight_g'!r}) is "
                         f"missing (expected shape {shape})")
      return np.zeros(shape, np.float32)
    return self.get(prefix + ".weight", shape)

  def check(self) -> None:
    if self.errors:
      raise ValueError(f"{self.what}: bad weights in {self.path}:\n  - " +
                       "\n  - ".join(self.errors))


class SafetensorsFolder:
  """Tensor name -> file for model.safetensors or an index of shards; reads one at a time."""

  def __init__(self, folder: str, what: str):
    self.what = what
    self._handles = {}  # path -> open safetensors file
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{what}: {index} has no 'weight_map' object")
      self.files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
      self.origin = index
    elif os.path.isfile(single):
      self._handles[single] = self._open(single)
      self.files = {name: single for name in self._handles[single].keys()}
      self.origin = single
    else:
      found = sorted(os.listdir(folder))
      raise ValueError(f"{what}: no {SINGLE_FILE} or {INDEX_FILE} in {folder} "
                       f"(found: {', '.join(found) or 'nothing'}); convert the weights to HF "
                       f"safetensors")

  def _open(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{self.what}: weights file {path} not found")
    try:
      return safetensors.safe_open(path, framework="numpy")
    except Exception as error:  # the header is not safetensors: another format or a bad file
      raise ValueError(f"{self.what}: {path} is not a safetensors file ({error})") from None

  def _handle(self, name: str):
    path = self.files[name]
    if path not in self._handles:
      self._handles[path] = self._open(path)
    return self._handles[path]

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def where(self, name: str) -> str:
    return self.files[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)
