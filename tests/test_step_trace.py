"""tools/step_trace: a compiled step's time split into forward, backward and update, read from
the step's own profiler trace."""
import jax
import jax.numpy as jnp

from jova_jax.tools import step_trace
from jova_jax.training import steps


def test_op_names_map_to_the_steps_parts():
  assert step_trace.phase_of(f"jit(train_step)/{steps.UPDATE_SCOPE}/ffi_call") == step_trace.UPDATE
  assert step_trace.phase_of("jit(train_step)/transpose(jvp())/closed_call/dot_general") == (
      step_trace.BACKWARD)
  assert step_trace.phase_of("jit(train_step)/jvp()/closed_call/reduce_sum") == step_trace.FORWARD
  assert step_trace.phase_of("reduce_sum") == step_trace.OTHER


def _toy_step():
  """A train step whose update (30 passes over 8 MiB) outweighs its forward and its backward
  (a 2 GFLOP matmul each; the backward's is one of the dots XLA CPU runs asynchronously)."""
  x = jnp.ones((4096, 512))

  def step(w, big):
    loss, grad = jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
    with jax.named_scope(steps.UPDATE_SCOPE):
      big = jax.lax.fori_loop(0, 30, lambda i, b: jnp.sin(b + 1e-3 * i), big)
      w = w - 1e-3 * grad * jnp.mean(big)
    return w, big, loss

  args = (jnp.ones((512, 512)), jnp.zeros((2_000_000,)))
  return jax.jit(step).lower(*args).compile(), args


def test_instructions_of_a_compiled_step_get_their_part():
  compiled, _ = _toy_step()
  text = compiled.as_text()
  op_names = step_trace.instruction_op_names(text)
  phases = {step_trace.phase_of(op_name) for op_name in op_names.values()}
  assert {step_trace.FORWARD, step_trace.BACKWARD, step_trace.UPDATE} <= phases
  # The loop holds update ops; it is a container, so it is not timed as one op itself.
  loops = [line.split("=")[0].split()[-1].lstrip("%") for line in text.splitlines()
           if " while(" in line]
  assert loops and not set(loops) & set(op_names)


def test_instructions_get_their_kind_from_the_ops_they_hold():
  """A matmul, a transposed copy concatenated to it, and a sine: one instruction of each kind
  (the matmul's fusion holds a dot, the concatenation only moves values)."""
  def f(x, w):
    y = x @ w
    return jnp.concatenate([y, y.T], axis=0), jnp.sin(x)

  text = jax.jit(f).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
  kinds = step_trace.instruction_kinds(text)
  op_names = step_trace.instruction_op_names(text)
  assert set(kinds) == set(op_names)
  start = text.index("ENTRY")
  entry = text[start:text.index("\n}", start)]
  kind_of_op = {op_names[name].rsplit("/", 1)[-1]: kind for name, kind in kinds.items()
                if op_names[name].startswith("jit(f)/") and f"%{name} = " in entry}
  assert kind_of_op == {"dot_general": step_trace.MATMUL, "concatenate": step_trace.LAYOUT,
                        "sin": step_trace.ELEMENTWISE}, kind_of_op


def test_a_profiled_step_splits_into_its_parts(tmp_path):
  compiled, args = _toy_step()
  holder = {"args": args}

  def run():
    *holder["args"], loss = compiled(*holder["args"])
    return loss

  profile = step_trace.profile_step(compiled, run, steps=5, trace_dir=str(tmp_path))
  seconds = profile.seconds
  forward, backward = seconds[step_trace.FORWARD], seconds[step_trace.BACKWARD]
  assert seconds[step_trace.UPDATE] > max(forward, backward), seconds
  # The backward's dot does the forward's FLOPs: counted to its completion, not its launch.
  assert backward > 0.3 * forward > 0, seconds
  # Ops fill most of each step; the rest is its dispatch and the machine's other work.
  assert 0.75 * seconds["step"] <= seconds["ops"] <= seconds["step"], seconds
  # The heaviest op is one pass of the update's loop or the matmuls, never a scalar.
  heaviest_seconds, _, heaviest_op_name = profile.heaviest[0]
  assert heaviest_seconds > 0.1 * seconds["step"], profile.heaviest
  assert heaviest_op_name.endswith(("sin", "dot_general")), profile.heaviest
  # By kind: the matmuls and the loop's sines carry the op time; nothing is left unclassified.
  kinds = profile.kinds
  assert set(kinds) == set(step_trace.KINDS), kinds
  assert kinds[step_trace.MATMUL] > 0 and kinds[step_trace.ELEMENTWISE] > 0, kinds
  assert kinds[step_trace.MATMUL] + kinds[step_trace.ELEMENTWISE] > 0.5 * sum(kinds.values()), kinds
