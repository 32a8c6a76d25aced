"""The accelerator installs pin jax to the version requirements.txt pins (one pip run, no swap)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(name):
  with open(os.path.join(ROOT, name)) as f:
    lines = [line.split('#')[0].strip() for line in f]
  return dict(re.match(r'^([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?)==(\S+)$', line).groups()
              for line in lines if line and not line.startswith('-r'))


@pytest.mark.parametrize('platform', ['cuda12', 'cuda13', 'tpu'])
def test_accelerator_requirements_add_only_jaxs_plugin_at_the_pinned_version(platform):
  cpu = _pins('requirements.txt')
  accelerator = _pins(f'requirements-{platform}.txt')
  assert accelerator == {f'jax[{platform}]': cpu['jax']}
  assert cpu['jaxlib'] == cpu['jax']
  with open(os.path.join(ROOT, 'scripts', 'setup.sh')) as f:
    assert platform in f.read()
