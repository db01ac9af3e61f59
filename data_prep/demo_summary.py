"""The demo's last stage: did the model learn? Faces found, lip sync against a control, and one
contact sheet.

  python -m data_prep.demo_summary --samples=demo/samples --references=demo/references \
      --prompts=demo/prompts.jsonl --sheet=demo/contact_sheet.png

- Faces: dlib's detector on every frame enlarged to --face_size (128 px: the demo renders
  32x32); a sample counts when a face is found in at least half of its frames.
- Lip sync: jova_jax.eval.sync's score of each video against its own audio and against every
  other video's audio (the shuffled-audio control, averaged), with the paired margin own minus
  control and its standard error; generated samples and held-out references.
- The contact sheet: each sample's frames, the held-out clip under the image-to-video ones
  (sample i2v_<clip> is matched with <references>/<clip>.mp4) and its mel spectrogram.
"""
from __future__ import annotations

import glob
import json
import os

import cv2
import numpy as np
from absl import flags

from jova_jax import cli
from jova_jax.errors import UserError
from jova_jax.eval import contact_sheet, sync
from jova_jax.media import io as media

_SAMPLES = flags.DEFINE_string("samples", "demo/samples", "Folder of generated mp4s.")
_REFERENCES = flags.DEFINE_string("references", "demo/references", "Held-out clips as mp4s.")
_PROMPTS = flags.DEFINE_string("prompts", "demo/prompts.jsonl", "The prompts file (sheet order).")
_SHEET = flags.DEFINE_string("sheet", "demo/contact_sheet.png", "Contact sheet PNG to write.")
_FACE_SIZE = flags.DEFINE_integer("face_size", 128, "Frames are enlarged to this size for dlib.")

MIN_FACE_FRAMES = 0.5


def face_fraction(frames: np.ndarray, size: int, tracker) -> float:
  """Share of frames in which dlib finds a face once each frame is resized to size x size."""
  big = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in frames])
  return float(tracker.track(big).face_frac)


def faces_report(paths: list[str], size: int) -> dict[str, float]:
  from jova_jax.media import faces
  tracker = faces.MouthTracker(detect_every=1)
  return {p: face_fraction(media.read_frames(p)[0], size, tracker) for p in paths}


def _sync_means(paths: list[str]) -> tuple[dict, int]:
  report = sync.score_videos(paths, shuffle_control=True) if len(paths) > 1 else {"clips": []}
  scored = sum("score" in c for c in report["clips"])
  return report.get("mean", {}), scored


def _format_sync(mean: dict, scored: int, total: int) -> str:
  if "score" not in mean:
    return f"no lip-sync score (a face in under half the frames of all {total} videos)"
  own, control = mean["score"], mean.get("control", {})
  line = (f"own audio peak {own['peak']:.3f} / confidence {own['confidence']:.3f}")
  if control:
    line += (f" vs shuffled-audio control {control['peak']:.3f} / {control['confidence']:.3f}"
             f" ({'above' if own['peak'] > control['peak'] else 'NOT above'} the control")
    margin = mean.get("margin")
    if margin:
      spread = margin["peak"] / margin["stderr"] if margin["stderr"] > 0 else float("inf")
      line += (f": paired margin {margin['peak']:+.3f} +- {margin['stderr']:.3f}, "
               f"{spread:.1f} standard errors")
    line += ")"
  return line + f", {scored} of {total} videos scored"


def sheet_entries(prompts_path: str, samples_dir: str, references_dir: str):
  names = []
  if os.path.exists(prompts_path):
    with open(prompts_path) as f:
      names = [json.loads(line).get("name") for line in f if line.strip()]
  paths = [os.path.join(samples_dir, f"{n}.mp4") for n in names if n]
  paths = [p for p in paths if os.path.exists(p)] or sorted(glob.glob(f"{samples_dir}/*.mp4"))
  entries = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    reference = os.path.join(references_dir, stem[len("i2v_"):] + ".mp4")
    entries.append(contact_sheet.read_entry(
        path, reference=reference if stem.startswith("i2v_") and os.path.exists(reference) else None))
  return entries


def main(argv):
  del argv
  samples = sorted(glob.glob(os.path.join(_SAMPLES.value, "*.mp4")))
  references = sorted(glob.glob(os.path.join(_REFERENCES.value, "*.mp4")))
  if not samples:
    raise UserError(f"--samples={_SAMPLES.value}: expected generated mp4 files, found none")
  size = _FACE_SIZE.value
  print(f"faces (dlib on frames enlarged to {size}x{size}; a video counts with a face in "
        f">= {MIN_FACE_FRAMES:.0%} of its frames):")
  results = {}
  for label, paths in (("generated", samples), ("references", references)):
    if not paths:
      continue
    fractions = faces_report(paths, size)
    for path, frac in fractions.items():
      print(f"  {label:10s} {os.path.basename(path):28s} face in {frac:6.1%} of frames")
    found = sum(frac >= MIN_FACE_FRAMES for frac in fractions.values())
    results[label] = (found, len(paths))
  print("lip sync (Pearson peak of mouth opening vs loudness, and confidence):")
  for label, paths in (("generated", samples), ("references", references)):
    if paths:
      mean, scored = _sync_means(paths)
      print(f"  {label:10s} {_format_sync(mean, scored, len(paths))}")
  entries = sheet_entries(_PROMPTS.value, _SAMPLES.value, _REFERENCES.value)
  contact_sheet.write(_SHEET.value, entries)
  print(f"contact sheet: {_SHEET.value} ({len(entries)} samples)")
  for label, (found, total) in results.items():
    print(f"SUMMARY {label}: a face in {found} of {total} videos")


if __name__ == "__main__":
  cli.run(main)
