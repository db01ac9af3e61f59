"""Benchmarks that print figures (never run by the tests):

  python -m jova_jax.bench model  --config=configs/demo.py   # forward+backward of the model
  python -m jova_jax.bench train  --config=configs/demo.py   # the real compiled train step
  python -m jova_jax.bench train  --config=configs/demo.py --breakdown --profile=/tmp/trace
  python -m jova_jax.bench sample --config=configs/demo.py   # seconds per sample / ODE step
  python -m jova_jax.bench codecs --config=configs/jova_24b.py

Throughput is compared with the matmul peak measured on the same device (and the published
peak where the device is known), so MFU is meaningful on any backend.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from jova_jax import config_lib
from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.model import summary
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.tools import plan, step_trace
from jova_jax.training import objective, perf, state as train_state, steps as train_steps

@dataclasses.dataclass(frozen=True)
class Options:
  """What the command line asks of a benchmark (flags: jova_jax/bench.py)."""
  steps: int = 5              # timed iterations after the warm-up
  breakdown: bool = False     # train: forward, forward+backward, update and step timed apart
  profile: str | None = None  # train: a jax.profiler trace of the timed steps goes here


def round_times(fns: dict, rounds: int) -> dict:
  """Seconds per call of each fn in each round, after one warm-up call each (compilation). The
  fns take turns every round, so a machine busy with other work slows them all alike, and
  ratios taken within a round compare calls that met the same load."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def medians(times: dict) -> dict:
  """{name: median} of round_times' {name: seconds of each round}."""
  return {name: statistics.median(t) for name, t in times.items()}


def _timed_interleaved(fns: dict, steps: int) -> dict:
  """Median seconds per call of each fn over `steps` interleaved rounds (round_times)."""
  return medians(round_times(fns, steps))


def _timed(fn, steps: int) -> float:
  return _timed_interleaved({"fn": fn}, steps)["fn"]


def _report(config, spec: config_lib.RunSpec, seconds: float, what: str) -> None:
  flops = summary.train_step_flops(spec.model, spec.batch_size)
  tokens = spec.shapes.joint_tokens * spec.batch_size
  n = jax.device_count()
  measured = perf.measure_matmul_peak(dtype=_compute_dtype(config))
  print(f"{what}: {seconds * 1e3:.1f} ms/step, batch {config.train.batch_size}, "
        f"{tokens / seconds:,.0f} tokens/s, {config.train.batch_size / seconds:.2f} examples/s")
  print(f"model FLOPs/step {flops:.3e}; {flops / seconds / 1e12:.3f} TFLOP/s on {n} "
        f"{jax.devices()[0].device_kind} device(s)")
  print(f"measured matmul peak {measured / 1e12:.3f} TFLOP/s per device -> "
        f"MFU vs measured {100 * perf.mfu(flops, seconds, measured, n):.1f}%")
  published = perf.published_peak()
  if published:
    print(f"published peak {published / 1e12:.0f} TFLOP/s per device -> "
          f"MFU {100 * perf.mfu(flops, seconds, published, n):.1f}%")


def _peak_rss_gib() -> float:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _compute_dtype(config):
  return {"bfloat16": jax.numpy.bfloat16}.get(config.model.compute_dtype, jax.numpy.float32)


def bench_model(config, opts: Options = Options()) -> None:
  mesh = mesh_lib.make_mesh(config)
  program = train_state.build_program(config, mesh)
  batch = train_state.model_inputs(SyntheticIterator(config, seed=0).batch(0))
  parts = _step_parts(config, program, jax.device_put(batch, program.batch_sharding))
  seconds = _timed(parts["forward+backward"], opts.steps)
  _report(config, program.spec, seconds, "model forward+backward")


def train_step_fns(config, breakdown: bool):
  """(calls to time, compiled step): the real compiled train step on synthetic batches and, with
  `breakdown`, its parts (forward, forward+backward, optimizer+EMA) on copies of its state."""
  mesh = mesh_lib.make_mesh(config)
  program = train_state.build_program(config, mesh)
  state = train_state.init_state(program)
  step = train_steps.compile_train_step(program)
  data = SyntheticIterator(config, seed=0)
  sharding = program.batch_sharding
  batches = [jax.device_put(train_state.model_inputs(data.batch(i)), sharding) for i in range(2)]
  holder = {"state": state, "i": 0}

  def one_step():
    with jax.set_mesh(mesh):
      holder["state"], metrics = step(holder["state"], batches[holder["i"] % 2])
    holder["i"] += 1
    return metrics["loss"]

  fns = {"step": one_step}
  if breakdown:
    fns.update(_step_parts(config, program, batches[0]))
  return fns, program, step


# The breakdown's row for XLA's update, timed beside the fused CPU kernel the step uses.
XLA_UPDATE = "  XLA's update"


def update_min_bytes(state_rows: dict) -> int:
  """The least memory traffic of an AdamW+EMA update, from plan.state_bytes' rows: it reads the
  gradient twice (its global norm comes first) and reads and writes params, mu, nu and the EMA
  once (10 passes over float32 params' bytes; 9 with a bfloat16 mu)."""
  return 2 * state_rows["gradients"] + 2 * (state_rows["params"] + state_rows["optimizer (mu+nu)"]
                                            + state_rows["ema"])


def _params_copy(program, params_bytes: int):
  """A timed copy of params_bytes per device (one read, one write), taking its turn with the
  step's parts so it meets the same caches: the yardstick of the update's memory floor."""
  mesh = program.mesh
  over_all_devices = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  per_device = params_bytes // 4  # float32 elements
  holder = {"x": jax.device_put(jnp.zeros((mesh.size * per_device,), jnp.float32),
                                over_all_devices)}
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)

  def run():
    holder["x"] = copy(holder["x"])
    return holder["x"]
  return run


def bench_train(config, opts: Options = Options()) -> None:
  fns, program, step = train_step_fns(config, opts.breakdown)
  if opts.breakdown:
    state_rows = plan.state_bytes(config, program.abstract.model, dict(program.mesh.shape))
    fns["params copy"] = _params_copy(program, state_rows["params"])
  mem = step.memory_analysis()
  if opts.profile:
    jax.profiler.start_trace(opts.profile)
  try:
    seconds = _timed_interleaved(fns, opts.steps)
  finally:
    if opts.profile:
      jax.profiler.stop_trace()
      print(f"profiler trace written to {opts.profile} (tensorboard --logdir={opts.profile})")
  _report(config, program.spec, seconds["step"], "train step")
  if opts.breakdown:
    with tempfile.TemporaryDirectory() as trace_dir:
      profile = step_trace.profile_step(step, fns["step"], opts.steps, trace_dir)
    _print_breakdown(program.spec, seconds, profile, state_rows)
  if mem is not None:
    print(f"memory per device: params+state (arguments) {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.1f} MiB")


def _step_parts(config, program, batch) -> dict:
  """Timed calls of the training loss alone, with its gradient, and of the step's update tail
  (optimizer+EMA) alone, on copies of the step's state (the step donates its own) and the same
  sharded batch. Where the step's update is the fused CPU kernel, XLA's update is timed too."""
  params = train_state.init_state(program)["params"]
  key = jax.random.key(0)
  loss = lambda p, b: objective.training_loss(program.graphdef, p, b, key, config)  # noqa: E731
  forward, grad = jax.jit(loss), jax.jit(jax.value_and_grad(loss, has_aux=True))
  grads = jax.tree.map(lambda p: p * 1e-3, params)

  def call(fn):
    def run():
      with jax.set_mesh(program.mesh):
        return fn(params, batch)
    return run

  def timed_update(fused_cpu):
    update = jax.jit(train_steps.make_update(program, fused_cpu), donate_argnums=0)
    holder = {"state": train_state.init_state(program)}  # its own buffers: the update donates them

    def run():
      with jax.set_mesh(program.mesh):
        holder["state"], metrics = update(holder["state"], grads, jax.numpy.float32(1.0))
      return metrics["grad_norm"]
    return run

  parts = {"forward": call(forward), "forward+backward": call(grad),
           "optimizer+EMA": timed_update(None)}
  if train_steps.uses_fused_cpu_update(program):
    parts[XLA_UPDATE] = timed_update(False)
  return parts


def _print_breakdown(spec: config_lib.RunSpec, seconds: dict, profile: step_trace.StepProfile,
                     state_rows: dict) -> None:
  """Two views of one step. Alone: forward, forward+backward and the update tail timed as
  programs of their own, backward = (forward+backward) - forward, with GFLOP/s. In step: the
  compiled step's own profile (tools/step_trace), each part the wall time its ops run, as a
  share of the profiled step; what an update costs the step is this column's.
  The update's floor: the least memory traffic of any AdamW+EMA update at the copy's rate."""
  forward_flops = summary.forward_flops(spec.model, spec.batch_size)
  fwd, grad, step = seconds["forward"], seconds["forward+backward"], seconds["step"]
  update = seconds["optimizer+EMA"]
  params_bytes = state_rows["params"]
  passes = update_min_bytes(state_rows) / params_bytes
  floor = passes / 2 * seconds["params copy"]
  in_step = profile.seconds
  traced_step = in_step["step"]
  rows = [("forward", fwd, forward_flops, in_step[step_trace.FORWARD]),
          ("backward", grad - fwd, 2 * forward_flops, in_step[step_trace.BACKWARD]),
          ("optimizer+EMA", update, None, in_step[step_trace.UPDATE])]
  if XLA_UPDATE in seconds:  # beside the fused kernel: what the step's update would cost without
    rows.append((XLA_UPDATE, seconds[XLA_UPDATE], None, None))
  rows += [("XLA's own ops", None, None, in_step[step_trace.OTHER]),
           ("no op running", None, None, traced_step - in_step["ops"]),
           ("step", step, 3 * forward_flops, traced_step), ("update floor", floor, None, None)]
  print(f"{'part':<14} {'alone ms':>9} {'% step':>7} {'GFLOP/s':>8} {'in step ms':>11} "
        f"{'% step':>7}")
  for name, alone, flops, traced in rows:
    rate = f"{flops / alone / 1e9:8.1f}" if flops and alone else f"{'-':>8}"
    alone_cols = (f"{alone * 1e3:9.1f} {100 * alone / step:7.1f}" if alone is not None
                  else f"{'-':>9} {'-':>7}")
    traced_cols = (f"{traced * 1e3:11.1f} {100 * traced / traced_step:7.1f}"
                   if traced is not None else f"{'-':>11} {'-':>7}")
    print(f"{name:<14} {alone_cols} {rate} {traced_cols}")
  print("in step: medians of the profiled steps; a part is the wall time any of its ops runs "
        "(parts whose ops overlap on different threads count in both). The ops that ran longest:")
  for op_seconds, name, op_name in profile.heaviest:
    print(f"  {op_seconds * 1e3:7.1f} ms {step_trace.phase_of(op_name):<13} {name:<28} "
          f"{op_name or '(XLA)'}")
  op_time = sum(profile.kinds.values())
  print("in step, op time by kind (summed over the ops, so ops side by side count twice, and with "
        "several pool threads an op's time includes its waits; PJRT_NPROC=1 runs one thread):")
  for kind, kind_seconds in profile.kinds.items():
    print(f"  {kind:<23} {kind_seconds * 1e3:8.1f} ms {100 * kind_seconds / op_time:5.1f}%")
  print(f"backward / forward = {(grad - fwd) / fwd:.2f} alone, "
        f"{in_step[step_trace.BACKWARD] / in_step[step_trace.FORWARD]:.2f} in step")
  print(f"update floor: {passes:g} passes over the params' "
        f"{params_bytes / 2**20:.1f} MiB per device at the rate of a copy timed alongside "
        f"({2 * params_bytes / seconds['params copy'] / 1e9:.1f} GB/s); optimizer+EMA = "
        f"{update / floor:.2f}x its floor alone, {in_step[step_trace.UPDATE] / floor:.2f}x in step")
  if XLA_UPDATE in seconds:
    print(f"optimizer+EMA is the fused CPU kernel (kernels/adamw_ema_cpu); XLA's update "
          f"{seconds[XLA_UPDATE] * 1e3:.1f} ms alone, {seconds[XLA_UPDATE] / floor:.2f}x the floor")


def bench_sample(config, opts: Options = Options()) -> None:
  from jova_jax.tools import sample_bench
  sample_bench.bench_sample(config)


def _codec(config, kind: str):
  """(codec, how its weights were got): the configured one from config.weights_dir, or, with
  none set, a pretrained codec's published architecture with random weights (the speed does
  not depend on the values)."""
  from jova_jax import codecs
  from jova_jax.codecs import bench_codecs, wan21
  random_codecs = {
      "wan21": lambda: wan21.Wan21Codec(wan21.random_params(wan21.Arch()), source="random"),
      "mmaudio16k": lambda: bench_codecs.random_mmaudio_codec("mmaudio16k"),
      "mmaudio44k": lambda: bench_codecs.random_mmaudio_codec("mmaudio44k"),
  }
  name = config[kind].codec
  if not config.weights_dir and name in random_codecs:
    return random_codecs[name](), "random weights, published sizes: config.weights_dir is empty"
  build = codecs.get_video_codec if kind == "video" else codecs.get_audio_codec
  return build(config, config.weights_dir or None), config.weights_dir or "built in"


def bench_codecs(config, opts: Options = Options()) -> None:
  """Encode/decode throughput of the configured codecs at the config's resolution and length
  (pretrained codecs read their weights from config.weights_dir, or run with random ones)."""
  import numpy as np
  v = config.video
  video, weights = _codec(config, "video")
  frames = np.random.default_rng(0).integers(0, 256, (1, v.frames, v.height, v.width, 3), np.uint8)
  enc = _timed(lambda: video.encode(frames), opts.steps)
  latents = video.encode(frames)
  dec = _timed(lambda: video.decode(latents), opts.steps)
  print(f"video {video.name} ({weights}) at {v.height}x{v.width}: encode {v.frames / enc:.1f} "
        f"frames/s, decode {v.frames / dec:.1f} frames/s; {v.frames}-frame clip: encode "
        f"{enc:.1f} s, decode {dec:.1f} s, peak host memory so far {_peak_rss_gib():.1f} GiB")
  audio, weights = _codec(config, "audio")
  samples = config_lib.audio_num_samples(config)
  wave = np.random.default_rng(1).uniform(-0.5, 0.5, (1, samples)).astype(np.float32)
  seconds = samples / config.audio.sample_rate
  enc = _timed(lambda: audio.encode(wave), opts.steps)
  latents = audio.encode(wave)
  dec = _timed(lambda: audio.decode(latents), opts.steps)
  print(f"audio {audio.name} ({weights}): encode {seconds / enc:.1f} audio s/s, decode "
        f"{seconds / dec:.2f} audio s/s")
  _bench_prepare_encode(video, audio, frames[0], wave[0], opts.steps)


def _bench_prepare_encode(video, audio, frames, wave, steps: int) -> None:
  """What data_prep.prepare's encoders sustain: one clip per local device per call, the batch
  split over the devices (data_prep.encode)."""
  import numpy as np

  from data_prep import encode
  devices = jax.local_devices()
  sharding = encode.batch_sharding(devices)
  batch = [jax.device_put(np.stack([x] * len(devices)), sharding) for x in (frames, wave)]
  seconds = _timed(lambda: (video.encode(batch[0]), audio.encode(batch[1])), steps)
  per_device = 1.0 / seconds
  print(f"prepare encode (video + audio, {len(devices)} clips over {len(devices)} "
        f"{devices[0].platform} devices per call): {per_device:.3f} clips/s per device, "
        f"{3600 * per_device * len(devices):.0f} clips/hour per host")


COMMANDS = {"model": bench_model, "train": bench_train, "sample": bench_sample,
            "codecs": bench_codecs}
