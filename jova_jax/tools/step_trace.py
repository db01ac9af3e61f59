"""Where a compiled train step's time goes, read from its own profiler trace.

Timing the step's parts as separate programs (`bench train --breakdown`'s "alone" column) also
times what the step does not pay for them: a call's dispatch of hundreds of arrays, outputs
written to fresh buffers, caches left by another program. Here the step runs under
jax.profiler and every op event of the trace is tied, by its HLO instruction's name, to the
op_name jax recorded for it: ops under `steps.UPDATE_SCOPE` are the optimizer+EMA update,
ops of a transposed jvp the backward, the rest of the loss the forward. A phase's time is the
wall time during which at least one of its ops runs, on any thread, so ops that run side by
side on two threads count once. Op times are also summed by kind (matmuls, layout, elementwise,
custom calls), read from the ops each instruction holds.

Tested on XLA CPU, whose thunk events carry the instruction names; a backend whose trace
names ops otherwise finds no ops, which `read_profile` reports as an error.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import statistics

import jax

from jova_jax.training import steps as train_steps

FORWARD, BACKWARD, UPDATE, OTHER = "forward", "backward", "optimizer+EMA", "other"
PHASES = (FORWARD, BACKWARD, UPDATE, OTHER)
# What an instruction does, from the ops it holds (a fusion: its fused computation's).
MATMUL, LAYOUT, ELEMENTWISE, CUSTOM_CALL = ("matmuls", "layout", "elementwise+reductions",
                                            "custom calls")
KINDS = (MATMUL, LAYOUT, ELEMENTWISE, CUSTOM_CALL)
# Ops that only move or replicate values: a fusion of nothing else is layout work.
_LAYOUT_OPS = {"parameter", "constant", "bitcast", "copy", "transpose", "reshape", "broadcast",
               "concatenate", "pad", "slice", "dynamic-slice", "dynamic-update-slice", "reverse",
               "tuple", "get-tuple-element"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")

# `%name = <shape> opcode(operands), ..., metadata={op_name="..." ...}`; the first `word(` after
# the `=` is the opcode (a shape never has one).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops that only hold other ops: their span is their body's, whose ops are counted themselves.
_CONTAINERS = {"while", "call", "conditional"}
# XLA CPU runs some ops asynchronously (Eigen's dots): the op's event is its launch, and an event
# named "end: <op>" marks its completion. Sync ops have one too, right after their event.
_END = "end: "
# Each profiled call runs inside a trace annotation of this name: the trace's step boundaries.
_STEP_EVENT = "step_trace.step"


def phase_of(op_name: str) -> str:
  if train_steps.UPDATE_SCOPE in op_name:
    return UPDATE
  if "transpose(" in op_name:  # jax names the backward pass transpose(jvp(...))
    return BACKWARD
  if op_name.startswith("jit("):
    return FORWARD
  return OTHER  # XLA's own instructions (copies it inserts) carry no jax op_name


def _instructions(hlo_text: str):
  """(computation, instruction, opcode, rest of its line) for every instruction of the text."""
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    opcode = _OPCODE.search(match.group(2)) if match else None
    if opcode:
      yield computation, match.group(1), opcode.group(1), match.group(2)


def instruction_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name jax gave it ("" for XLA's own), for every instruction
  of the compiled module's text but the containers."""
  op_names = {}
  for _, name, opcode, rest in _instructions(hlo_text):
    if opcode not in _CONTAINERS:
      op_name = _OP_NAME.search(rest)
      op_names[name] = op_name.group(1) if op_name else ""
  return op_names


def _kind_of(opcodes: set[str]) -> str:
  if opcodes & {"dot", "convolution"}:
    return MATMUL  # with whatever XLA fused around the product
  if "custom-call" in opcodes:
    return CUSTOM_CALL
  return LAYOUT if opcodes <= _LAYOUT_OPS else ELEMENTWISE


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its kind (KINDS), for the instructions instruction_op_names lists:
  a fusion by the opcodes of the computation it calls, any other by its own opcode."""
  opcodes, held = collections.defaultdict(set), {}
  for computation, name, opcode, rest in _instructions(hlo_text):
    opcodes[computation].add(opcode)
    if opcode not in _CONTAINERS:
      called = _CALLS.search(rest)
      held[name] = called.group(1) if called else {opcode}
  # Every computation is read before a fusion's is looked up: the text may list it later.
  return {name: _kind_of(ops if isinstance(ops, set) else opcodes[ops])
          for name, ops in held.items()}


def _union_seconds(intervals: list[tuple[int, int]]) -> float:
  total, end = 0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total / 1e9


def _until_completion(spans: list[tuple[int, int]], ends: list[int]) -> list[tuple[int, int]]:
  """Each launch of an op lasts until its first completion before the op's next launch (a run
  completes before the next starts); a launch with none lasts its own event."""
  lasting, j = [], 0
  for i, (start, stop) in enumerate(spans):
    next_start = spans[i + 1][0] if i + 1 < len(spans) else float("inf")
    while j < len(ends) and ends[j] < start:
      j += 1
    if j < len(ends) and ends[j] <= next_start:
      stop = max(stop, ends[j])
      j += 1
    lasting.append((start, stop))
  return lasting


def _in_window(spans: list[tuple[int, int]], window: tuple[int, int]) -> list[tuple[int, int]]:
  """The spans that start in the window, cut to it."""
  begin, end = window
  return [(start, min(stop, end)) for start, stop in spans if begin <= start < end]


@dataclasses.dataclass(frozen=True)
class StepProfile:
  """Medians over the profiled steps, in seconds: "step", "ops" (some op running) and each phase;
  the instructions that ran longest, as (seconds per step, instruction, op_name); and per kind
  (KINDS) the seconds per step its instructions ran, summed over them (ops side by side on two
  threads both count, and an op's time includes any wait for a pool thread)."""
  seconds: dict[str, float]
  heaviest: list[tuple[float, str, str]]
  kinds: dict[str, float]


def read_profile(trace_file: str, op_names: dict[str, str], kinds: dict[str, str],
                 top: int = 10) -> StepProfile:
  windows, launches, completions = [], collections.defaultdict(list), collections.defaultdict(list)
  for plane in jax.profiler.ProfileData.from_file(trace_file).planes:
    for line in plane.lines:
      for event in line.events:
        stop = event.start_ns + event.duration_ns
        if event.name == _STEP_EVENT:
          windows.append((event.start_ns, stop))
        elif event.name in op_names:
          launches[event.name].append((event.start_ns, stop))
        elif event.name.startswith(_END) and event.name[len(_END):] in op_names:
          completions[event.name[len(_END):]].append(stop)
  if not windows or not launches:
    raise RuntimeError(f"{trace_file}: {len(windows)} profiled steps, {len(launches)} events named "
                       f"after an instruction of the step ({jax.default_backend()} traces may "
                       "name ops otherwise)")
  spans = {name: _until_completion(sorted(s), sorted(completions.get(name, ())))
           for name, s in launches.items()}
  per_step = []
  for window in sorted(windows):
    in_step = {name: _in_window(s, window) for name, s in spans.items()}
    by_phase = {phase: [] for phase in PHASES}
    for name, s in in_step.items():
      by_phase[phase_of(op_names[name])] += s
    seconds = {phase: _union_seconds(s) for phase, s in by_phase.items()}
    seconds["ops"] = _union_seconds([span for s in by_phase.values() for span in s])
    per_step.append({"step": (window[1] - window[0]) / 1e9, **seconds})
  medians = {key: statistics.median(step[key] for step in per_step) for key in per_step[0]}
  per_op = sorted(((sum(stop - start for start, stop in s) / 1e9 / len(windows), name,
                    op_names[name]) for name, s in spans.items()), reverse=True)
  by_kind = dict.fromkeys(KINDS, 0.0)
  for op_seconds, name, _ in per_op:
    by_kind[kinds[name]] += op_seconds
  return StepProfile(medians, per_op[:top], by_kind)


def profile_step(compiled, run, steps: int, trace_dir: str) -> StepProfile:
  """Profiles `steps` calls of `run` (one call of `compiled`, blocked on) under jax.profiler."""
  hlo_text = compiled.as_text()
  op_names = instruction_op_names(hlo_text)
  jax.block_until_ready(run())  # warm: no first-call costs in the trace
  jax.profiler.start_trace(trace_dir)
  try:
    for _ in range(steps):
      with jax.profiler.TraceAnnotation(_STEP_EVENT):
        jax.block_until_ready(run())
  finally:
    jax.profiler.stop_trace()
  trace_file = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
  return read_profile(trace_file, op_names, instruction_kinds(hlo_text))
