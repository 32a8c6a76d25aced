"""config.distributed: True, False and 'auto' (initialise only on a detected cluster)."""
import jax
import pytest

from patchmerger.training import sharding

CLUSTER_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
                     'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                     'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri', 'TPU_WORKER_HOSTNAMES')


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of starting anything."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  recorded = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args: recorded.append(args))
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
  assert calls == [(None, None, None)]  # jax reads the rest from SLURM.
  assert sharding.maybe_initialize_distributed(False) is False and len(calls) == 1


def test_a_coordinator_address_initialises_with_auto_and_false(calls, monkeypatch):
  assert sharding.maybe_initialize_distributed('auto', '127.0.0.1:1234', 2, 1) is True
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '0')
  assert sharding.maybe_initialize_distributed(False) is True
  assert calls == [('127.0.0.1:1234', 2, 1), ('127.0.0.1:1234', 2, 0)]


def test_true_without_a_cluster_fails_with_one_clear_line(calls, monkeypatch):

  def no_cluster(*args):  # What jax raises when nothing describes a cluster.
    raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(jax.distributed, 'initialize', no_cluster)
  with pytest.raises(RuntimeError, match='no cluster was found'):
    sharding.maybe_initialize_distributed(True)
  with pytest.raises(ValueError, match="True, False or 'auto'"):
    sharding.maybe_initialize_distributed('sometimes')
