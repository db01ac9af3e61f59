"""Text-to-speech with espeak-ng through its C API (library and voice data from espeakng-loader).

No system package is needed: `espeakng_loader` ships libespeak-ng and espeak-ng-data. The
library is initialised once per process in synchronous mode, and a synth callback collects
the 16-bit samples into a list instead of playing them.
"""
import ctypes
import threading

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
PARAM_RATE, PARAM_PITCH = 1, 3
EE_OK = 0

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 0 continues.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class Synthesizer:
  """One espeak-ng engine (the library holds global state: use one per process)."""

  _lock = threading.Lock()  # espeak-ng's state is global to the process

  def __init__(self):
    import espeakng_loader
    self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self._lib.espeak_Initialize.restype = ctypes.c_int
    self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                            ctypes.c_int]
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    self._lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                       ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                       ctypes.c_void_p, ctypes.c_void_p]
    data_path = espeakng_loader.get_data_path().encode()
    self.sample_rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data {data_path}")
    self._chunks: list[np.ndarray] = []
    self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the engine
    self._lib.espeak_SetSynthCallback(self._callback)

  def _collect(self, wav, num_samples, events):
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0

  def synthesize(self, text: str, voice: str = "en-us", rate: int = 170,
                 pitch: int = 50) -> np.ndarray:
    """float32 mono wave in [-1, 1] at self.sample_rate.

    voice: an espeak-ng voice name, optionally with a variant ("en-us+f3"); rate: words per
    minute (80-450); pitch: 0-100 (50 is the voice's normal pitch).
    """
    with self._lock:
      if self._lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
        raise ValueError(f"espeak-ng has no voice {voice!r}")
      self._lib.espeak_SetParameter(PARAM_RATE, int(rate), 0)
      self._lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
      # The female variants (+f2, +f3, ...) add breath noise from espeak-ng's random generator,
      # which each process starts from the clock: seeded here, a run's utterances come out the
      # same in every run, and so does the demo corpus.
      self._lib.espeak_ng_SetRandSeed(0)
      self._chunks = []
      encoded = text.encode("utf-8") + b"\0"
      status = self._lib.espeak_Synth(encoded, len(encoded), 0, POS_CHARACTER, 0,
                                      ESPEAK_CHARS_UTF8, None, None)
      if status != EE_OK:
        raise RuntimeError(f"espeak_Synth failed ({status}) on {text!r}")
      self._lib.espeak_Synchronize()
      samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
    return samples.astype(np.float32) / 32768.0
