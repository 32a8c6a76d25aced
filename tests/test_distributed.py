"""config.distributed: True, False and 'auto' (initialise only on a detected cluster)."""
import jax
import pytest

from patchmerger.training import sharding

CLUSTER_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                     'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                     'SLURM_LOCALID', 'SLURM_STEP_TASKS_PER_NODE', 'SLURM_TASKS_PER_NODE',
                     'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_LOCAL_SIZE', 'TPU_WORKER_HOSTNAMES',
                     'JAX_LOCAL_DEVICE_IDS', 'CUDA_VISIBLE_DEVICES')


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting anything."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, local_device_ids=None: recorded.append(
                          (*args, local_device_ids)))
  return recorded


@pytest.mark.parametrize('value', ['auto', 'AUTO', False, 'False', '0'])
def test_one_process_without_a_cluster_initialises_nothing(value, calls):
  assert sharding.detected_cluster() is None
  assert sharding.maybe_initialize_distributed(value) is False
  assert calls == [] and jax.process_count() == 1


def test_auto_initialises_on_a_slurm_job_of_several_tasks(calls, monkeypatch):
  monkeypatch.setenv('SLURM_JOB_ID', '17')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[1-2]')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  monkeypatch.setenv('SLURM_PROCID', '0')
  monkeypatch.setenv('SLURM_LOCALID', '0')
  # One task is one host: it keeps all its devices, without jax.distributed.
  assert sharding.maybe_initialize_distributed('auto') is False and calls == []
  monkeypatch.setenv('SLURM_NTASKS', '2')
  assert sharding.detected_cluster() == 'SlurmCluster'
  assert sharding.maybe_initialize_distributed('auto') is True
  assert calls == [(None, None, None, None)]  # jax reads the rest from SLURM.
  assert sharding.maybe_initialize_distributed(False) is False and len(calls) == 1


def test_a_coordinator_address_initialises_with_auto_and_false(calls, monkeypatch):
  assert sharding.maybe_initialize_distributed('auto', '127.0.0.1:1234', 2, 1) is True
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '0')
  assert sharding.maybe_initialize_distributed(False) is True
  assert calls == [('127.0.0.1:1234', 2, 1, None), ('127.0.0.1:1234', 2, 0, None)]


def test_true_without_a_cluster_fails_with_one_clear_line(calls, monkeypatch):

  def no_cluster(*args, **kwargs):  # What jax raises when nothing describes a cluster.
    raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(jax.distributed, 'initialize', no_cluster)
  with pytest.raises(RuntimeError, match='no cluster was found'):
    sharding.maybe_initialize_distributed(True)
  with pytest.raises(ValueError, match="True, False or 'auto'"):
    sharding.maybe_initialize_distributed('sometimes')


def test_one_slurm_task_per_host_keeps_every_gpu(calls, monkeypatch):
  """jax alone would pin each task to the GPU numbered like its local rank: GPU 0
  of each host when there is one task per host."""
  for name, value in (('SLURM_JOB_ID', '17'), ('SLURM_STEP_NODELIST', 'node[1-2]'),
                      ('SLURM_NTASKS', '2'), ('SLURM_PROCID', '0'), ('SLURM_LOCALID', '0'),
                      ('SLURM_STEP_TASKS_PER_NODE', '1(x2)'),
                      ('CUDA_VISIBLE_DEVICES', '0,1,2,3')):
    monkeypatch.setenv(name, value)
  assert sharding.maybe_initialize_distributed('auto') is True
  assert calls[-1] == (None, None, None, [0, 1, 2, 3])
  monkeypatch.setenv('SLURM_STEP_TASKS_PER_NODE', '4(x2)')  # One task per GPU: jax's rule.
  assert sharding.maybe_initialize_distributed('auto') is True
  assert calls[-1] == (None, None, None, None)


@pytest.mark.parametrize('environ,gpus,expected', [
    ({'OMPI_COMM_WORLD_LOCAL_SIZE': '1'}, 8, list(range(8))),
    ({'OMPI_COMM_WORLD_LOCAL_SIZE': '8'}, 8, None),
    ({'SLURM_TASKS_PER_NODE': '1'}, 2, [0, 1]),
    ({'SLURM_TASKS_PER_NODE': '1', 'JAX_LOCAL_DEVICE_IDS': '0'}, 8, None),  # The user's.
    ({'SLURM_TASKS_PER_NODE': '1'}, 1, None),  # One GPU or none: nothing to choose.
    ({'SLURM_TASKS_PER_NODE': '1', 'CUDA_VISIBLE_DEVICES': '3,5'}, None, [0, 1]),
    ({'SLURM_TASKS_PER_NODE': '1(x2),1'}, 4, [0, 1, 2, 3]),
    ({'SLURM_TASKS_PER_NODE': '1,2(x3)'}, 4, None),  # Some nodes run two: jax's rule.
    ({'SLURM_TASKS_PER_NODE': '2(x3),1'}, 4, None),
    ({'SLURM_TASKS_PER_NODE': '1', 'CUDA_VISIBLE_DEVICES': '0,-1,1'}, None, None),  # One GPU.
    ({}, 8, None),  # No SLURM or Open MPI task.
])
def test_local_device_ids(environ, gpus, expected):
  assert sharding.local_device_ids(environ, gpus) == expected
