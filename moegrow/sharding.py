"""Logical axes -> mesh axes: one table, one context, no model changes.

Parameters declare logical axes (`embed, mlp, heads, kv, vocab, expert`), activations are
constrained with (`batch, length, ...`). `LOGICAL_RULES` maps each logical name to mesh axes
`(data, fsdp, expert, tensor)`; inside `use_mesh(mesh)` the model's `constrain` calls become
sharding constraints, outside they are no-ops (single device, tests, notebooks).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axes (None: replicated). Batch over data+fsdp (and expert, which holds
# data-parallel replicas of the non-expert layers), params fully sharded over fsdp,
# experts over expert, hidden and heads over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query key/value heads; replicated where tensor does not divide U
    ("kv", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("act_expert", "expert"),
    ("layers", None),
)

_CTX: dict[str, Any] = {"mesh": None, "rules": LOGICAL_RULES}


def logical_to_spec(axes: Sequence[str | None], rules=None, mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axes; mesh axes of size 1 or used twice are dropped."""
  table = dict(rules or _CTX["rules"])
  used: set[str] = set()
  out = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    target = (target,) if isinstance(target, str) else tuple(target)
    keep = tuple(a for a in target if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
  return P(*out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=None) -> Iterator[None]:
  """Activate `mesh` (and optionally another rules table) for `constrain` calls."""
  old = dict(_CTX)
  _CTX.update(mesh=mesh, rules=rules or LOGICAL_RULES)
  try:
    yield
  finally:
    _CTX.update(old)


def current_mesh() -> Mesh | None:
  """The mesh activated by `use_mesh` (None outside)."""
  return _CTX["mesh"]


def platform(mesh: Mesh | None = None) -> str:
  """The platform the program is compiled for: that of `mesh`'s devices (default: the active mesh),
  else the default backend. A TPU mesh built from an ahead-of-time topology on a CPU host says
  'tpu', so kernel choices follow the target, not the host."""
  mesh = mesh if mesh is not None else _CTX["mesh"]
  if mesh is not None:
    name = str(mesh.devices.flat[0].platform).lower()
  else:
    name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def device_kind(mesh: Mesh | None = None) -> str:
  """The device kind of `mesh` (default: the active mesh), e.g. 'TPU v5 lite'; '' without a mesh."""
  mesh = mesh if mesh is not None else _CTX["mesh"]
  return "" if mesh is None else str(getattr(mesh.devices.flat[0], "device_kind", ""))


def batch_axes(mesh: Mesh, batch_size: int | None = None) -> tuple[str, ...]:
  """Mesh axes (size > 1) the batch is split over; () if `batch_size` does not divide."""
  spec = logical_to_spec(("batch",), mesh=mesh)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  if batch_size is not None and axes and batch_size % _axis_size(mesh, axes):
    return ()
  return axes


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axes; identity when no mesh is active."""
  mesh = _CTX["mesh"]
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(axes, mesh=mesh)
  dims = [_axis_size(mesh, s) for s in spec]
  if any(d > 1 and n % d for d, n in zip(dims, x.shape)):
    return x  # not evenly divisible (e.g. tiny eval batch): let XLA decide
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in names)


def mesh_sizes(shape: dict[str, int] | Sequence[int], num_devices: int) -> list[int]:
  """Axis sizes of (data, fsdp, expert, tensor) with the one -1 ("the rest") resolved for
  `num_devices`; ValueError if there are several -1 or the others do not divide the devices."""
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {sizes} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  return sizes


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """Mesh over axes (data, fsdp, expert, tensor); one size may be -1 ("the rest").

  On TPU the devices are laid out by `mesh_utils` so the inner axes (fsdp, expert, tensor) ride the
  torus's fast links, splitting physical axes where a 2-D or 3-D torus needs it (v4, v5p: e.g.
  fsdp=8 on a 4x4x4 cube). Devices from several slices (multi-slice, `slice_index`) get a hybrid
  mesh: `data` is split across the slices (over DCN), the other axes stay inside one slice.
  """
  devices = np.asarray(devices if devices is not None else jax.devices())
  sizes = mesh_sizes(shape, devices.size)
  if math.prod(sizes) < devices.size and jax.process_count() == 1:
    devices = devices.reshape(-1)[: math.prod(sizes)]  # explicit sizes may use a subset (one host)
  if math.prod(sizes) != devices.size:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {devices.size}")
  flat = devices.reshape(-1).tolist()
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if str(flat[0].platform).lower() != "tpu":
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=flat)
  return Mesh(tpu_device_grid(sizes, flat), MESH_AXES, axis_types=auto)


def tpu_device_grid(sizes: Sequence[int], devices: list) -> np.ndarray:
  """TPU devices arranged as an array of `sizes` (see `make_mesh`); ValueError naming the mesh
  and the slices when the data axis cannot be split across them."""
  from jax.experimental import mesh_utils  # TPU layout helpers
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) == 1:
    return mesh_utils.create_device_mesh(tuple(sizes), devices, allow_split_physical_axes=True)
  n = len(slices)
  if sizes[0] % n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} spans {n} slices: the data axis ({sizes[0]}) must be "
                     f"a multiple of the number of slices (data parallelism across slices over DCN)")
  ici = (sizes[0] // n,) + tuple(sizes[1:])
  dcn = (n,) + (1,) * (len(sizes) - 1)
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def from_full(batch: dict, batch_sharding: NamedSharding, keys=("inputs", "targets")) -> dict:
  """A batch every process holds in full (eval) -> global arrays split over the batch axes."""
  return {k: jax.make_array_from_callback(batch[k].shape, batch_sharding, lambda i, x=batch[k]: x[i]) for k in keys}


def tree_shardings(axes_tree: Any, mesh: Mesh, shapes_tree: Any | None = None) -> Any:
  """NamedShardings for a tree of logical-axes tuples (leaves: tuples of names).

  With `shapes_tree`, a dimension that its mesh axes do not divide is replicated instead.
  """
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)

  def one(axes, shape=None):
    spec = list(logical_to_spec(axes, mesh=mesh))
    if shape is not None:
      spec = [s if n % _axis_size(mesh, s) == 0 else None for s, n in zip(spec, shape)]
    return NamedSharding(mesh, P(*spec))

  if shapes_tree is None:
    return jax.tree_util.tree_map(one, axes_tree, is_leaf=is_axes)
  return jax.tree_util.tree_map(lambda a, s: one(a, s.shape), axes_tree, shapes_tree, is_leaf=is_axes)
