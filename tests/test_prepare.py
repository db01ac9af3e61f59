"""data_prep.prepare end to end on the demo corpus: rejects, sharding, crashes, and the dataset
the trainer reads (its pieces alone: test_prepare_units.py)."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from data_prep import clips, job, manifest, shards
from jova_jax import config_lib
from jova_jax.data import features
from jova_jax.media import io as media
from tests.conftest import REPO, load

NUM_GOOD = 4
# make_demo_corpus --with_bad_clips: one clip per reject reason, clip_NNNNN_<kind>.
BAD_REASONS = {"corrupt": "unreadable", "no_audio": "no_audio", "faceless": "no_face",
               "too_short": "too_short"}
# The corpus's too_short clip lasts 1 s: tiny's 5 frames at 8 fps would fit, 9 do not.
FRAMES = 9


# ------------------------------------------------------------------ end to end on the demo corpus

def _tiny(dataset_dir=""):
  config = load("tiny")
  config.video.frames = FRAMES
  config.data.dir = str(dataset_dir)
  config.data.read_threads = 1
  return config


def _records(dataset_dir, split):
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(str(dataset_dir)).as_data_source(split)
  return {r["clip_id"].decode(): r for r in (source[i] for i in range(len(source)))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  subprocess.run([sys.executable, "-m", "data_prep.make_demo_corpus", f"--out={out}",
                  f"--num_clips={NUM_GOOD}", "--with_bad_clips"], cwd=REPO, check=True)
  return str(out)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  """One single-shard run through the command line (2 workers), as a user runs it."""
  out = tmp_path_factory.mktemp("prepared") / "dataset"
  result = subprocess.run(
      [sys.executable, "-m", "data_prep.prepare", f"--input={corpus}", f"--output={out}",
       f"--config={REPO}/configs/tiny.py", f"--config.video.frames={FRAMES}", "--workers=2",
       "--batch_size=3", "--bench"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, json.loads(result.stdout[result.stdout.index("{"):])


def test_prepared_dataset_matches_the_config(prepared):
  out, bench = prepared
  config = _tiny(out)
  shapes = config_lib.latent_shapes(config)
  metadata = features.read_metadata(out)
  features.check_metadata(metadata, config, out)
  records = {**_records(out, "train"), **(_records(out, "eval") if "eval" in metadata["counts"] else {})}
  assert len(records) == NUM_GOOD == sum(metadata["counts"].values())
  for clip_id, r in records.items():
    assert r["video_latent"].shape == shapes.video and r["video_latent"].dtype == np.float16
    assert r["audio_latent"].shape == shapes.audio and r["audio_latent"].dtype == np.float16
    assert r["mouth_mask"].shape == shapes.video[:3] and r["mouth_mask"].dtype == np.uint8
    assert 0 < r["mouth_mask"].sum() < r["mouth_mask"].size / 2, clip_id
    assert 1 <= r["text_emb"].shape[0] <= config.text.max_length
    assert r["text_emb"].shape[1] == config.text.width
    assert r["caption"].decode().startswith("<Video Caption>: ")
    assert "<Audio Caption>: " in r["caption"].decode() and "<Transcript>: " in r["caption"].decode()
    assert r["face_frac"] >= 0.5
  # pixels and mel normalise by themselves: identity statistics (data/latent_norm.py).
  for name, channels in (("video", shapes.video[-1]), ("audio", shapes.audio[-1])):
    assert metadata["latent_norm"][name] == {"source": "codec", "mean": [0.0] * channels,
                                             "std": [1.0] * channels}
  assert bench["kept"] == metadata["counts"] and bench["clips"] == NUM_GOOD + len(BAD_REASONS)
  assert set(bench["stages"]) == set(shards.STAGES)


def test_bad_clips_are_rejected_with_their_reason(prepared):
  out, _ = prepared
  with open(os.path.join(out, "rejects.jsonl")) as f:
    rejects = [json.loads(line) for line in f]
  assert {r["clip_id"].split("_", 2)[-1]: r["reason"] for r in rejects} == BAD_REASONS
  for r in rejects:
    assert set(r) == {"clip_id", "path", "reason", "detail"} and r["detail"]
  assert features.read_metadata(out)["rejects"] == {reason: 1 for reason in BAD_REASONS.values()}


def test_one_train_batch_from_the_prepared_dataset(prepared):
  from jova_jax.data import pipeline
  from jova_jax.parallel.mesh import make_mesh
  out, _ = prepared
  config = _tiny(out)
  config.mesh.update(data=2, fsdp=4)
  batch = next(iter(pipeline.make_train_iterator(config, make_mesh(config))))
  shapes = config_lib.latent_shapes(config)
  assert batch["video"].shape == (config.train.batch_size, *shapes.video)
  assert batch["audio"].shape == (config.train.batch_size, *shapes.audio)


def test_two_shards_and_finalize_equal_one_shard(prepared, corpus, tmp_path, monkeypatch):
  from jova_jax.codecs.pixels import PixelsCodec
  single, _ = prepared
  config = _tiny()
  # A video codec without published statistics: prepare measures them (data/latent_norm.py).
  monkeypatch.setattr(PixelsCodec, "normalises", False)
  out = str(tmp_path / "sharded")
  for index in (0, 1, 0):  # shard 0 twice: a rerun replaces its output, nothing is duplicated
    report = job.run_shard(config, corpus, out, num_shards=2, shard_index=index, batch_size=2)
    assert report["shard_index"] == index
  metadata = shards.finalize(out, config)
  want = features.read_metadata(single)
  assert metadata["counts"] == want["counts"] and metadata["rejects"] == want["rejects"]
  for split in want["counts"]:
    got, ref = _records(out, split), _records(single, split)
    assert sorted(got) == sorted(ref)
    for clip_id in ref:
      for key in ("video_latent", "audio_latent", "mouth_mask", "text_emb", "caption", "face_frac"):
        np.testing.assert_array_equal(got[clip_id][key], ref[clip_id][key], err_msg=f"{clip_id} {key}")
  # The records above are codec space whatever the statistics; the two shards' measured video
  # statistics merge into those of the whole train split, recomputed here from the records.
  assert metadata["latent_norm"]["audio"] == want["latent_norm"]["audio"]  # mel: identity
  assert metadata["latent_norm"]["video"]["source"] == "measured"
  video = np.stack([r["video_latent"] for r in _records(out, "train").values()]).astype(np.float64)
  video = video.reshape(-1, video.shape[-1])
  np.testing.assert_allclose(metadata["latent_norm"]["video"]["mean"], video.mean(0), atol=2e-3)
  np.testing.assert_allclose(metadata["latent_norm"]["video"]["std"],
                             np.where(video.std(0) > 1e-6, video.std(0), 1.0), atol=2e-3)
  with open(os.path.join(out, "rejects.jsonl")) as a, open(os.path.join(single, "rejects.jsonl")) as b:
    assert sorted(a) == sorted(b)
  # A missing shard is refused by name.
  os.remove(os.path.join(out, shards.STAGING, shards.shard_tag(1, 2), shards.REPORT))
  with pytest.raises(features.DatasetError, match=r"shards \[1\] of 2"):
    shards.finalize(out, config)


def test_one_reader_prepare_sampler_and_sync_get_the_same_frames(corpus):
  """A centre-cropped prepared clip equals an OpenCV reference and what media.read_video /
  read_audio (the sampler's given media) and eval.sync read from the same file."""
  config = _tiny()
  config.video.face_centered_crop = False
  options = job.clip_options(config, min_face_frac=0.5, crop_margin=0.5, detect_every=4)
  path = os.path.join(corpus, "clip_00001.mp4")
  clip = clips.prepare_clip(path, options)
  capture = cv2.VideoCapture(path)
  source_fps, frames = capture.get(cv2.CAP_PROP_FPS), []
  while True:
    ok, frame = capture.read()
    if not ok:
      break
    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
  picks = np.floor(np.arange(FRAMES) * source_fps / config.video.fps + 0.5).astype(int)
  h, w = frames[0].shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  want = np.stack([cv2.resize(frames[i][top:top + side, left:left + side], (16, 16),
                              interpolation=cv2.INTER_AREA) for i in picks])
  np.testing.assert_array_equal(clip.frames, want)
  # One reader: the sampler's given video and audio are these very frames and samples.
  np.testing.assert_array_equal(media.read_video(path, config.video.fps, FRAMES, 16, 16), clip.frames)
  np.testing.assert_array_equal(
      media.read_audio(path, config.audio.sample_rate, config_lib.audio_num_samples(config)), clip.audio)
  every, fps = media.read_frames(path)
  assert fps == source_fps
  np.testing.assert_array_equal(every, np.stack(frames))
  assert clip.audio.shape == (config_lib.audio_num_samples(config),)
  assert clip.mouth_mask.shape == (FRAMES, 16, 16) and clip.mouth_mask.any()


def test_records_hold_their_own_clip(prepared, corpus):
  """Batching and padding keep each record's latents with its clip_id."""
  from jova_jax import codecs
  out, _ = prepared
  config = _tiny(out)
  options = job.clip_options(config, min_face_frac=0.5, crop_margin=0.5, detect_every=4)
  video_codec, audio_codec = codecs.get_video_codec(config), codecs.get_audio_codec(config)
  for clip_id, record in _records(out, "train").items():
    clip = clips.prepare_clip(os.path.join(corpus, clip_id + ".mp4"), options)
    video = np.asarray(video_codec.encode(clip.frames[None]))[0].astype(np.float16)
    audio = np.asarray(audio_codec.encode(clip.audio[None]))[0].astype(np.float16)
    np.testing.assert_array_equal(record["video_latent"], video)
    np.testing.assert_allclose(record["audio_latent"], audio, atol=1e-2)
    np.testing.assert_array_equal(record["mouth_mask"],
                                  video_codec.pixel_mask_to_latent(clip.mouth_mask))


def _crash_on_bad(path):
  """A worker function that kills its process on clips named 'bad*' (a crashing decoder)."""
  if os.path.basename(path).startswith("bad"):
    os._exit(3)
  return path.upper()


def test_a_worker_crash_rejects_only_its_clip():
  entries = [manifest.ClipEntry(clip_id=name, path=name, captions={})
             for name in ("a", "bad1", "b", "c", "bad2", "d")]
  got = [(e.clip_id, r) for e, r in job.prepared_clips(entries, _crash_on_bad, workers=2, window=4)]
  assert [c for c, _ in got] == [e.clip_id for e in entries]
  for clip_id, result in got:
    if clip_id.startswith("bad"):
      assert isinstance(result, clips.ClipRejected) and result.reason == "unreadable"
    else:
      assert result == clip_id.upper()



def test_a_submit_to_a_broken_pool_fails_at_the_result_not_at_the_submit():
  """A clip crashing its worker while the clips behind it are still being submitted breaks the
  pool under the submitting loop; that must surface where prepared_clips handles crashes."""
  import multiprocessing
  from concurrent import futures
  from concurrent.futures.process import BrokenProcessPool
  with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
    with pytest.raises(BrokenProcessPool):
      pool.submit(_crash_on_bad, "bad").result()
    with pytest.raises(BrokenProcessPool):
      pool.submit(_crash_on_bad, "good")  # what prepared_clips used to call
    with pytest.raises(BrokenProcessPool):
      job.submit_to(pool, _crash_on_bad, "good").result()


# ------------------------------------------------------------------ an existing dataset is never lost

def _copy_of(dataset_dir, tmp_path):
  out = str(tmp_path / "dataset")
  shutil.copytree(dataset_dir, out)
  return out


def _assert_same_dataset(out, reference):
  counts = features.read_metadata(reference)["counts"]
  assert features.read_metadata(out)["counts"] == counts
  for split in counts:
    got, want = _records(out, split), _records(reference, split)
    assert sorted(got) == sorted(want)
    for clip_id in want:
      np.testing.assert_array_equal(got[clip_id]["video_latent"], want[clip_id]["video_latent"])


def _clips_named(corpus, tmp_path, name, suffixes):
  folder = tmp_path / name
  folder.mkdir()
  for file in os.listdir(corpus):
    if any(file.endswith(s) for s in suffixes):
      shutil.copy(os.path.join(corpus, file), folder / file)
  return str(folder)


def test_an_empty_or_all_rejected_input_leaves_the_dataset(prepared, corpus, tmp_path):
  single, _ = prepared
  out = _copy_of(single, tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(manifest.ManifestError, match=f"^0 clips found in {empty};"):
    job.run_shard(_tiny(), str(empty), out)
  _assert_same_dataset(out, single)
  bad = _clips_named(corpus, tmp_path, "bad", ("_faceless.mp4", "_faceless.json",
                                               "_corrupt.mp4", "_corrupt.json"))
  with pytest.raises(features.DatasetError, match="input was .*--overwrite"):  # another input
    job.run_shard(_tiny(), bad, out)
  job.run_shard(_tiny(), bad, out, overwrite=True)
  failed = os.path.join(out, shards.STAGING, shards.REJECTS)
  with pytest.raises(features.DatasetError, match=f"^all 2 clips rejected, see {failed};"):
    shards.finalize(out, _tiny())
  with open(failed) as f:
    assert sorted(json.loads(line)["reason"] for line in f) == ["no_face", "unreadable"]
  _assert_same_dataset(out, single)
  with open(os.path.join(out, shards.REJECTS)) as a, open(os.path.join(single, shards.REJECTS)) as b:
    assert a.read() == b.read()


def test_another_config_needs_overwrite(prepared, corpus, tmp_path, caplog):
  single, _ = prepared
  out = _copy_of(single, tmp_path)
  with pytest.raises(features.DatasetError, match="min_face_frac was 0.5, now 0.6.*--overwrite"):
    job.run_shard(_tiny(), corpus, out, min_face_frac=0.6)
  _assert_same_dataset(out, single)
  two = _clips_named(corpus, tmp_path, "two", ("_00000.mp4", "_00000.json", "_00001.mp4", "_00001.json"))
  job.run_shard(_tiny(), two, out, overwrite=True, eval_fraction=0.0)
  metadata = shards.finalize(out, _tiny())
  assert metadata["counts"] == {"train": 2} and metadata["prepared_from"]["input"] == two
  assert "has no 'eval' split" in caplog.text
  assert sorted(_records(out, "train")) == ["clip_00000", "clip_00001"]
  assert os.path.getsize(os.path.join(out, shards.REJECTS)) == 0  # it exists with no rejects
  assert not glob.glob(f"{out}.*") and not glob.glob(os.path.join(out, shards.STAGING, "*.*-*"))


def test_kill_9_during_prepare_leaves_the_dataset_and_the_next_run_cleans_up(prepared, corpus,
                                                                             tmp_path):
  single, _ = prepared
  out = _copy_of(single, tmp_path)
  job_process = subprocess.Popen(
      [sys.executable, "-m", "data_prep.prepare", f"--input={corpus}", f"--output={out}",
       f"--config={REPO}/configs/tiny.py", f"--config.video.frames={FRAMES}"],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  partial = os.path.join(out, shards.STAGING, shards.shard_tag(0, 1) + ".partial-*")
  deadline = time.time() + 120
  while not glob.glob(partial) and job_process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)  # into the clips
  job_process.send_signal(signal.SIGKILL)
  job_process.wait()
  assert glob.glob(partial), "the job ended before it was killed"
  _assert_same_dataset(out, single)
  job.run_shard(_tiny(), corpus, out)
  shards.finalize(out, _tiny())
  _assert_same_dataset(out, single)
  assert not glob.glob(f"{out}.*") and not glob.glob(os.path.join(out, shards.STAGING, "*.*-*"))


def test_a_swap_killed_between_its_renames_is_undone(prepared, tmp_path):
  single, _ = prepared
  out = _copy_of(single, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  tag = f"{socket.gethostname()}-{dead.pid}"
  os.replace(out, f"{out}.old-{tag}")  # the old dataset moved aside, the new one not yet in
  os.makedirs(f"{out}.partial-{tag}")
  removed = shards.clean_stale(out)
  assert removed == [f"{out}.partial-{tag}"]
  _assert_same_dataset(out, single)
