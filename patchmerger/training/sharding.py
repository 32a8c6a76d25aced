"""Device mesh, shardings and multi-process start-up.

The mesh has three axes: 'data' (pure data parallelism), 'fsdp' (data
parallelism whose devices also split the parameters and optimizer state) and
'expert' (data parallelism whose devices also split the experts of MoE layers,
models/experts.py; size 1 unless config.mesh.expert says otherwise). Batches are
split over all three; expert weights put their leading E axis on 'expert', and
large parameters are sharded over 'fsdp'.
"""
import collections
import functools
import logging
import os
from typing import Any, Iterator, Mapping, Optional, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from patchmerger.errors import ClusterError, ConfigError

BATCH_AXES = ('data', 'fsdp', 'expert')
EXPERT_AXIS = 'expert'  # models/experts.py constrains its buffers to it.


# jax's cluster environments that `distributed='auto'` trusts: schedulers and
# TPU pods. Kubernetes (any pod looks like a cluster) and mpi4py (opt-in) need
# distributed=True.
AUTO_CLUSTERS = ('SlurmCluster', 'OmpiCluster', 'GceTpuCluster', 'GkeTpuCluster')


def detected_cluster(coordinator_address: Optional[str] = None) -> Optional[str]:
  """The name of the multi-process cluster this process runs in, or None.

  A coordinator address (flag or $JAX_COORDINATOR_ADDRESS) names one; otherwise
  jax's own detection (the one `jax.distributed.initialize()` uses) is asked for
  SLURM, Open MPI and TPU pods. A job of one process (one SLURM task, a
  single-host TPU VM) is no cluster: it runs on all local devices without
  jax.distributed, which would otherwise pin it to one of them.
  """
  if coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'coordinator address'
  try:
    from jax._src import clusters  # Private, hence guarded: jax's own detection.
    environments = [env for env in clusters.ClusterEnv._cluster_types
                    if env.__name__ in AUTO_CLUSTERS]
  except (ImportError, AttributeError):
    environments = []
  for environment in environments:
    try:
      if not environment.is_env_present():
        continue
      processes = environment.get_process_count()
    except Exception:  # pylint: disable=broad-except  Present but unreadable: let
      processes = None  # jax.distributed.initialize() report it.
    if processes is None or processes > 1:
      return environment.__name__
  return None


def _visible_gpu_count(environ: Mapping[str, str]) -> int:
  """NVIDIA GPUs this process may use, read without starting a JAX backend."""
  visible = environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:  # CUDA stops at the first invalid entry, e.g. -1.
    ids = [d.strip() for d in visible.split(',')]
    return len(ids[:ids.index('-1')] if '-1' in ids else [d for d in ids if d])
  try:
    return len(os.listdir('/proc/driver/nvidia/gpus'))
  except OSError:
    return 0


def local_device_ids(environ: Mapping[str, str] = os.environ,
                     gpu_count: Optional[int] = None) -> Optional[list[int]]:
  """The GPUs for jax.distributed when this is the only SLURM or Open MPI task on
  its host, else None (jax's choice). jax would pin every task of such a cluster
  to the one GPU numbered like its local rank: one task per node on an 8-GPU
  node would train on GPU 0 alone (jax-ml/jax#16788). $JAX_LOCAL_DEVICE_IDS wins."""
  if environ.get('JAX_LOCAL_DEVICE_IDS'):
    return None
  if 'OMPI_COMM_WORLD_LOCAL_SIZE' in environ:
    one_task_here = environ['OMPI_COMM_WORLD_LOCAL_SIZE'].strip() == '1'
  else:  # SLURM: '8', '1(x4)' or '2(x3),1' (tasks per node, node by node): all ones.
    per_node = (environ.get('SLURM_STEP_TASKS_PER_NODE')
                or environ.get('SLURM_TASKS_PER_NODE') or '')
    one_task_here = bool(per_node) and all(
        part.split('(')[0].strip() == '1' for part in per_node.split(','))
  if not one_task_here:
    return None
  count = _visible_gpu_count(environ) if gpu_count is None else gpu_count
  return list(range(count)) if count > 1 else None


def parse_distributed(value: Union[bool, str]) -> Union[bool, str]:
  """True, False or 'auto' from a bool or a command-line string."""
  text = str(value).strip().lower()
  if text in ('true', '1', 'yes'):
    return True
  if text in ('false', '0', 'no'):
    return False
  if text == 'auto':
    return 'auto'
  raise ConfigError(f"config.distributed must be True, False or 'auto', got {value!r}")


def maybe_initialize_distributed(requested: Union[bool, str],
                                 coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Starts the multi-controller runtime when `requested` is True, or when it is
  'auto' (the default) and a cluster is detected; a coordinator address from
  flags or $JAX_COORDINATOR_ADDRESS counts as a request. False never starts it
  unless a coordinator address is given. Returns whether it was started.

  Process count and id come from the arguments, $JAX_NUM_PROCESSES and
  $JAX_PROCESS_ID, or jax's own cluster detection (SLURM, Open MPI, TPU pods).
  """
  requested = parse_distributed(requested)
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  cluster = detected_cluster(coordinator_address) if requested == 'auto' else None
  if not (requested is True or coordinator_address or cluster):
    return False
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  # CPU processes need an explicit cross-process collectives backend; GPUs and
  # TPUs ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids())
  except (ValueError, RuntimeError) as e:  # No cluster described, or none answered.
    raise ClusterError(
        f'config.distributed=True but no cluster was found or joined ({e}). On one host use '
        "--config.distributed=auto (the default) or False; on a cluster pass "
        '--coordinator_address, --num_processes and --process_id (or set '
        'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID), or run under '
        'SLURM or on a TPU pod.') from None
  logging.info('jax.distributed (%s): process %d of %d', cluster or 'requested',
               jax.process_index(), jax.process_count())
  return True


def make_mesh(mesh_config: Mapping[str, int]) -> Mesh:
  """Mesh from {'data': n, 'fsdp': m, 'expert': e}; one size may be -1 (all the rest),
  a missing one is 1."""
  num_devices = jax.device_count()
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in BATCH_AXES}
  unknown = set(mesh_config) - set(BATCH_AXES) - {'fsdp_min_size'}
  if unknown:
    raise ConfigError(f'Unknown mesh axes {sorted(unknown)}; expected {BATCH_AXES}')
  free = [axis for axis, size in sizes.items() if size == -1]
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if len(free) > 1 or fixed < 1 or num_devices % fixed:
    raise ConfigError(f'Mesh {dict(mesh_config)} does not fit {num_devices} devices.')
  if free:
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f'Mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, '
                      f'but there are {num_devices}.')
  devices = np.asarray(jax.devices()).reshape([sizes[a] for a in BATCH_AXES])
  return Mesh(devices, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def is_expert_weight(path: Any) -> bool:
  """Whether a leaf (of the parameters or of optimizer state that mirrors them) is an
  MoE layer's stacked expert weight, `.../Moe/Mlp/...` [E, ...]."""
  keys = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  return any(a == 'Moe' and b == 'Mlp' for a, b in zip(keys, keys[1:]))


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2 ** 12) -> Any:
  """Expert weights put their leading E axis on 'expert'. Besides, each large
  array's largest dimension divisible by the 'fsdp' axis is sharded over it;
  small or indivisible arrays stay replicated."""
  axis_size = mesh.shape['fsdp']
  experts = mesh.shape.get(EXPERT_AXIS, 1)

  def spec(path, leaf):
    shape = getattr(leaf, 'shape', ())
    parts = [None] * len(shape)
    if experts > 1 and is_expert_weight(path) and shape:
      if shape[0] % experts:
        raise ConfigError(f'{shape[0]} experts do not split over mesh.expert={experts}: '
                          'use an expert axis that divides model.moe.num_experts.')
      parts[0] = EXPERT_AXIS
    if axis_size > 1 and int(np.prod(shape)) >= min_size:
      for dim in np.argsort(shape)[::-1]:
        if parts[dim] is None and shape[dim] % axis_size == 0:
          parts[dim] = 'fsdp'
          break
    return NamedSharding(mesh, P(*parts)) if any(parts) else replicated(mesh)

  return jax.tree_util.tree_map_with_path(spec, tree)


def under_mesh(fn: Any, mesh: Mesh) -> Any:
  """`fn`, traced with `mesh` in context: MoE layers read it to send their buffers
  to the experts' devices (models/experts.run_experts)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def bytes_per_device(tree: Any) -> int:
  """Bytes of `tree`'s arrays held by the first device (shards count once)."""
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def to_host(tree: Any) -> Any:
  """`tree` as numpy arrays, whole, on every process. Arrays that span several
  hosts (FSDP over hosts) are gathered: then every process must call this."""
  if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # Only needed on several hosts.
  return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> globally sharded jax.Arrays."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def prefetch_to_device(local_batches: Iterator[Mapping[str, np.ndarray]],
                       sharding: NamedSharding, size: int = 2) -> Iterator[dict]:
  """Global batches, each started on its way to the devices `size` steps before the
  step that uses it, so host-to-device copies overlap the running step."""
  queue = collections.deque()
  for local in local_batches:
    queue.append(global_batch(local, sharding))  # Transfers are asynchronous.
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
