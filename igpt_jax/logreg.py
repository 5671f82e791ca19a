"""Multinomial logistic regression for linear probes, every feature group and L2 strength at once.

Features come in groups (one per probed layer, or one concatenation); each group is standardised
with its train moments and fitted for every candidate L2; the candidate with the best validation
accuracy gives the group's test accuracy. Two solvers:

- `fit_in_memory`: full-batch L-BFGS on features held whole (small sets: the exact optimum).
- `fit_streamed`: mini-batch Adam with cosine decay over chunks read from a features.Store, on
  the mesh (each process feeds its own rows), all groups and L2 values in one pass per epoch,
  rows shuffled across several chunks, the L2 grid widened past an edge by one more fit.
  Host memory holds the shuffle buffer; device memory one batch and the weights
  [G, L2, D, classes].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _penalised_ce(w, b, x, y_onehot, weights, l2):
  """Mean CE over weighted rows + l2/2 |W|^2 (bias unpenalised), for one group and L2."""
  logits = x @ w + b
  ce = -jnp.sum(weights * jnp.sum(y_onehot * jax.nn.log_softmax(logits), -1)) / jnp.maximum(
      jnp.sum(weights), 1.0)
  return ce + 0.5 * l2 * jnp.sum(w * w)


# -- in memory: L-BFGS ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("steps", "intercept"))
def _lbfgs(x, y_onehot, l2, steps: int, intercept: bool = True):
  d, c = x.shape[1], y_onehot.shape[1]
  params = {"w": jnp.zeros((d, c)), "b": jnp.zeros((c,))}
  ones = jnp.ones((x.shape[0],))
  def loss(p):
    b = p["b"] if intercept else jax.lax.stop_gradient(p["b"])  # intercept-free: b stays 0
    return _penalised_ce(p["w"], b, x, y_onehot, ones, l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return params


def _accuracy(p, x, y) -> float:
  return float(jnp.mean(jnp.argmax(x @ p["w"] + p["b"], -1) == y))


WIDEN = 3  # at most this many factors of 10 added beyond an edge of the L2 grid


def _grid_search(fit_and_score, l2_grid, widen: int = WIDEN):
  """fit_and_score(l2) -> (validation accuracy, anything) over `l2_grid`; while the best is at
  an edge of the values tried, one more value 10x beyond it (at most `widen` per side), so the
  chosen L2 is bracketed by worse ones unless the widening ran out. -> (best l2, its validation
  accuracy, its anything, every l2 tried, whether the best is still at an edge)."""
  tried = {float(l2): None for l2 in l2_grid}
  for l2 in sorted(tried):
    tried[l2] = fit_and_score(l2)
  # Ties go to the stronger penalty: the simpler model, and a plateau of equal accuracies at
  # small L2 then counts as bracketed instead of widening towards zero.
  pick = lambda: max(tried, key=lambda v: (tried[v][0], v))  # noqa: E731
  added = {"low": 0, "high": 0}
  while len(tried) > 1:  # one value given = an L2 fixed by hand: kept
    best, values = pick(), sorted(tried)
    side = "low" if best == values[0] else "high" if best == values[-1] else None
    if side is None or added[side] >= widen:
      break
    added[side] += 1
    new = best / 10 if side == "low" else best * 10
    tried[new] = fit_and_score(new)
  best, values = pick(), sorted(tried)
  return best, tried[best][0], tried[best][1], values, len(values) > 1 and best in (
      values[0], values[-1])


def fit_in_memory(train, val, test, num_classes: int, l2_grid, steps: int = 200,
                  predictions: bool = False, widen: int = WIDEN) -> list[dict]:
  """train/val/test: (x [N, G, D] float32, y [N]). One result per group: test accuracy at the
  L2 with the best validation accuracy (the grid widened past an edge, see _grid_search), the
  L2 values tried and `l2_at_edge`; with `predictions`, the test predictions [N] as well.
  `widen=0` keeps to the grid given (as fit_streamed does)."""
  (xt, yt), (xv, yv), (xs, ys) = train, val, test
  mean, std = xt.mean(0), xt.std(0) + 1e-6
  onehot = jax.nn.one_hot(yt, num_classes)
  results = []
  for g in range(xt.shape[1]):
    norm = lambda x: jnp.asarray((x[:, g] - mean[g]) / std[g])  # noqa: E731

    def fit_and_score(l2):
      p = _lbfgs(norm(xt), onehot, float(l2), steps)
      return _accuracy(p, norm(xv), yv), p

    l2, val_acc, p, tried, at_edge = _grid_search(fit_and_score, l2_grid, widen)
    predicted = np.asarray(jnp.argmax(norm(xs) @ p["w"] + p["b"], -1))
    best = {"accuracy": float(np.mean(predicted == ys)), "l2": l2, "val_accuracy": val_acc,
            "l2_tried": tried, "l2_at_edge": at_edge}
    if predictions:
      best["predictions"] = predicted.astype(np.int16)
    results.append(best)
  return results


def _mean_preconditioner(x: np.ndarray) -> np.ndarray:
  """[D, D]: shrinks the direction of the features' mean m to unit length. Uncentred features
  with |m| >> 1 make an intercept-free fit ill-conditioned along m; in the coordinates x @ P it
  is not, and since P is symmetric the weights are P @ w'. The L2 penalty on w' weighs the
  mean direction (the bias-like one) less, much as an unpenalised intercept would. On the last
  layer of an 8-step demo model (mean/std ~6), 200 L-BFGS steps reached 0.509 validation
  accuracy with it, 0.489 without (with an intercept: 0.533)."""
  m = x.mean(0).astype(np.float64)
  norm = float(np.linalg.norm(m))
  if norm <= 1.0:
    return np.eye(len(m), dtype=np.float32)
  unit = m / norm
  return (np.eye(len(m)) + (1.0 / norm - 1.0) * np.outer(unit, unit)).astype(np.float32)


def fit_classifier(train, val, num_classes: int, l2_grid, steps: int = 200,
                   intercept: bool = True) -> dict:
  """train/val: (x [N, D] float32, y [N]). The L2 with the best validation accuracy and its
  classifier: logits = ((x - mean) / std) @ w + b. Returns {'w' [D, C], 'b' [C], 'mean' [D],
  'std' [D], 'l2', 'train_accuracy', 'val_accuracy'} (numpy). `intercept=False`: a linear map
  alone, b = 0 and mean = 0 (centring would be a bias), x only scaled by 1/std."""
  (xt, yt), (xv, yv) = train, val
  mean, std = xt.mean(0), xt.std(0) + 1e-6
  precondition = None  # with an intercept the standardised features are well conditioned
  if not intercept:
    mean = np.zeros_like(mean)
    precondition = _mean_preconditioner(xt / std)

  def norm(x):
    x = (x - mean) / std
    return jnp.asarray(x if precondition is None else x @ precondition)
  onehot = jax.nn.one_hot(yt, num_classes)

  def fit_and_score(l2):
    p = _lbfgs(norm(xt), onehot, float(l2), steps, intercept)
    return _accuracy(p, norm(xv), yv), p

  l2, val_acc, p, tried, at_edge = _grid_search(fit_and_score, l2_grid)
  best = {"p": p, "l2": l2, "val_accuracy": val_acc, "l2_tried": tried, "l2_at_edge": at_edge,
          "train_accuracy": _accuracy(p, norm(xt), yt)}
  p = best.pop("p")
  w = np.asarray(p["w"], np.float32)
  return {"w": w if precondition is None else precondition @ w, "b": np.asarray(p["b"], np.float32),
          "mean": np.asarray(mean, np.float32), "std": np.asarray(std, np.float32), **best}


# -- streamed: mini-batch Adam on the mesh ----------------------------------------------------

def _batches(store, rows: int, lo: int, view, rng, shuffle: bool, mix: int = 1):
  """This process's rows of each global batch: [rows, G, D] and labels, from its own chunks.
  Shuffled: chunks in random order, `mix` of them at a time pooled and permuted together (a
  shuffle buffer across chunks: a store written in class order, as a folder's is, still gives
  batches of many classes; a convex problem needs no more)."""
  names = store.chunk_names([lo])
  order = [int(i) for i in (rng.permutation(len(names)) if shuffle else range(len(names)))]
  x_left, y_left = None, None
  for start in range(0, len(order), mix if shuffle else 1):
    pooled = list(store.chunks([lo], view, order[start:start + (mix if shuffle else 1)]))
    x, y = np.concatenate([c[0] for c in pooled]), np.concatenate([c[1] for c in pooled])
    if shuffle:
      perm = rng.permutation(len(y))
      x, y = x[perm], y[perm]
    if x_left is not None:
      x, y = np.concatenate([x_left, x]), np.concatenate([y_left, y])
    full = len(y) // rows * rows
    for i in range(0, full, rows):
      yield x[i:i + rows], y[i:i + rows]
    x_left, y_left = x[full:], y[full:]
  if x_left is not None and len(y_left):
    pad = rows - len(y_left)
    yield (np.concatenate([x_left, np.zeros((pad, *x_left.shape[1:]), x_left.dtype)]),
           np.concatenate([y_left, np.full(pad, -1, np.int32)]))


def _my_range(store, mesh, rules, batch_size: int) -> tuple[int, int]:
  """(this process's rows of a fit batch, the store range it reads): the store was written
  under the same mesh, so the k-th distinct row range of a fit batch reads the k-th range."""
  from igpt_jax import distributed
  from igpt_jax import sharding as sharding_lib
  mine = sharding_lib.host_rows(mesh, rules, batch_size)
  lo = int(mine[0])
  distinct = sorted(set(distributed.allgather(np.int32(lo)).tolist()))
  ranges = store.ranges()
  if len(ranges) != len(distinct):
    raise ValueError(f"{store.path} was written by {len(ranges)} row ranges, this mesh has "
                     f"{len(distinct)}; extract the features again under this mesh.")
  return len(mine), ranges[distinct.index(lo)]


def _moments(store, lo: int, view):
  """The train moments, each process reading only its own range (the first process holding a
  range sums it; replicas skip it), combined across processes."""
  from igpt_jax import distributed
  los = distributed.allgather(np.int32(lo)).tolist()
  first = los.index(lo) == jax.process_index()
  total, total_sq, n = store.sums(view, [lo] if first else [])
  if jax.process_count() > 1:
    shape = (store.groups if view is None else len(view),
             store.dim * (1 if view is None else len(view[0])))
    packed = np.stack([np.broadcast_to(np.asarray(total, np.float64), shape),
                       np.broadcast_to(np.asarray(total_sq, np.float64), shape),
                       np.full(shape, float(n))])
    # float64 travels as its bytes (int32 pairs): a gather would round it to float32 (no x64).
    gathered = distributed.allgather(np.ascontiguousarray(packed).view(np.int32))
    total, total_sq, n = np.ascontiguousarray(gathered).view(np.float64).sum(0)
    n = int(n.flat[0])
  return store.moments(view, sums=(total, total_sq, n))


def fit_streamed(train, val, test, num_classes: int, l2_grid, *, mesh, rules, batch_size: int,
                 epochs: int, lr: float, seed: int, view=None, log=None,
                 buffer_bytes: int = 0, widen: int = WIDEN) -> list[dict]:
  """train/val/test: features.Store. Same results as fit_in_memory, within a fraction of a
  percent, without ever holding a split in memory: every L2 value is fitted in one pass per
  epoch; where a group's best is at an edge of the grid, one more fit tries `widen` values 10x
  apart beyond that edge (as fit_in_memory widens, in one run instead of one at a time).
  `buffer_bytes`: host memory for the shuffle buffer across chunks."""
  rows, lo = _my_range(train, mesh, rules, batch_size)
  mean, std = _moments(train, lo, view)
  chunk_rows = train.rows(lo) / max(len(train.chunk_names([lo])), 1)
  mix = max(1, int(buffer_bytes // max(chunk_rows * mean.size * 4, 1)))
  fit = lambda grid: _streamed_pass(  # noqa: E731
      train, val, test, num_classes, grid, mesh=mesh, rules=rules, batch_size=batch_size,
      epochs=epochs, lr=lr, seed=seed, view=view, log=log, rows=rows, lo=lo, moments=(mean, std),
      mix=mix)
  grid = sorted(float(v) for v in l2_grid)
  val_acc, test_acc = fit(grid)  # [G, L2]
  pick = lambda accs, g: max(range(len(grid)), key=lambda i: (accs[g, i], grid[i]))  # noqa: E731
  if widen and len(grid) > 1:
    best = [pick(val_acc, g) for g in range(val_acc.shape[0])]
    extra = ([grid[0] / 10 ** k for k in range(widen, 0, -1)] if 0 in best else []) + (
        [grid[-1] * 10 ** k for k in range(1, widen + 1)] if len(grid) - 1 in best else [])
    if extra:
      if log:
        log(f"probe fit: the best L2 is at an edge of {grid}; fitting {extra} as well.")
      more_val, more_test = fit(extra)
      order = np.argsort(grid + extra)
      grid = sorted(grid + extra)
      val_acc = np.concatenate([val_acc, more_val], 1)[:, order]
      test_acc = np.concatenate([test_acc, more_test], 1)[:, order]
  results = []
  for g in range(val_acc.shape[0]):
    # Ties to the stronger penalty, as in _grid_search.
    best = pick(val_acc, g)
    results.append({"accuracy": float(test_acc[g, best]), "l2": grid[best],
                    "val_accuracy": float(val_acc[g, best]), "l2_tried": list(grid),
                    "l2_at_edge": len(grid) > 1 and best in (0, len(grid) - 1)})
  return results


def _streamed_pass(train, val, test, num_classes: int, l2_grid, *, mesh, rules,
                   batch_size: int, epochs: int, lr: float, seed: int, view, log, rows: int,
                   lo: int, moments, mix: int):
  """Mini-batch Adam over the store for every group and L2 value at once; -> validation and
  test accuracy [G, L2]."""
  from igpt_jax import distributed
  from igpt_jax import sharding as sharding_lib
  mean, std = moments
  groups, dim = mean.shape
  l2 = jnp.asarray(np.asarray(l2_grid, np.float32))
  n_l2 = len(l2_grid)
  steps_per_epoch = -(-train.rows(lo) // rows)
  total = max(epochs * steps_per_epoch, 1)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(100, total // 10), total))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put({"w": jnp.zeros((groups, n_l2, dim, num_classes)),
                           "b": jnp.zeros((groups, n_l2, num_classes))}, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  mean_d, std_d = jax.device_put((jnp.asarray(mean), jnp.asarray(std)), replicated)

  def logits_of(p, x):
    x = (x.astype(jnp.float32) - mean_d) / std_d  # [B, G, D]
    return jnp.einsum("bgd,gldc->bglc", x, p["w"]) + p["b"]

  @jax.jit
  def step(p, opt_state, x, y):
    def loss(p):
      valid = (y >= 0).astype(jnp.float32)
      logp = jax.nn.log_softmax(logits_of(p, x))  # [B, G, L2, C]
      nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None, None, None], -1)[..., 0]
      ce = jnp.sum(nll * valid[:, None, None], 0) / jnp.maximum(jnp.sum(valid), 1.0)
      return jnp.sum(ce) + 0.5 * jnp.sum(l2 * jnp.sum(p["w"] ** 2, axis=(2, 3)))
    grads = jax.grad(loss)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  @jax.jit
  def correct(p, x, y):
    hit = jnp.argmax(logits_of(p, x), -1) == y[:, None, None]
    return jnp.sum(hit * (y >= 0)[:, None, None], 0), jnp.sum(y >= 0)

  def to_global(x, y):
    g = sharding_lib.global_batch({"x": x, "y": y}, mesh, rules, batch_size)
    return g["x"], g["y"]

  from igpt_jax import evaluation
  one_at_a_time = evaluation.one_in_flight(mesh)
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    distributed.PREEMPTION.check("probe")  # every process, each epoch
    for x, y in _batches(train, rows, lo, view, rng, shuffle=True, mix=mix):
      params, opt_state = step(params, opt_state, *to_global(x, y))
      # On a CPU mesh of several devices (evaluation.one_in_flight), one step in flight: queued
      # ones deadlock XLA's CPU collectives (a later step's all-reduce holds the thread pool
      # that an earlier one's last device needs, until the 40 s rendezvous timeout aborts the
      # process; seen with 4 and 8 simulated devices on 2 cores; across processes, gloo hung
      # after a few hundred). Accelerators keep async dispatch: the host reads the next chunk
      # while the device steps.
      if one_at_a_time:
        jax.block_until_ready(params)
    if log:
      log(f"probe fit: epoch {epoch + 1}/{epochs}")

  def accuracy(store):
    hits, n = 0, 0
    for x, y in _batches(store, rows, _my_range(store, mesh, rules, batch_size)[1], view, rng,
                         shuffle=False):
      h, c = correct(params, *to_global(x, y))
      hits, n = hits + distributed.to_host(h), n + int(distributed.to_host(c))
    return hits / max(n, 1)  # [G, L2]

  return accuracy(val), accuracy(test)
