"""Several stages of one config at once, each in a process of its own (main's
--side_by_side=N).

Stages of a multi-stage config that do not use each other (the quickstart's rows on
one base model) can train at once, each on its own GPUs of a host. Here they are
scheduled over up to N child processes, each
``python -m hyperlora_jax.main <the same flags> --stages=<one stage>``: a stage starts
when the stages it names ('stage:<name>', `stages.needs`) are finished, so the base
model trains alone and the rows on it train together. With at least N GPUs on the host
(CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`) each child gets its own 1/N of them;
with fewer, the children share them, each with 0.9 / N of the memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless set): on one H200, four 3,000-step quickstart
rows so trained were only 6% faster than one after another (BENCHMARKS.md), since each
keeps the GPU busy. Each child writes its log to <workdir>/logs/<stage>.log; a last
child, with every stage finished, writes the report on every device (with --stages,
only those stages are scheduled, and there is no report).

This process schedules only: it never starts a JAX backend, which would take the
device memory its children need. A failed stage stops the others (SIGTERM: they save
and resume on the next launch) and names its log.
"""
import collections
import os
import signal
import subprocess
import sys
import time

from absl import logging

from hyperlora_jax import cli
from hyperlora_jax import stages


class StageFailed(RuntimeError):
  """A child process's stage did not finish."""


def child_argv(argv, stage=None):
  """main's command line for one child: `argv` without --side_by_side and --stages,
  plus --stages=<stage> (None: every stage, the report's launch)."""
  out, skip = [sys.executable, '-m', 'hyperlora_jax.main'], False
  for arg in argv[1:]:
    if skip:
      skip = False
      continue
    name = arg.split('=', 1)[0]
    if name in ('--side_by_side', '--stages'):
      skip = '=' not in arg  # The value is the next argument.
      continue
    out.append(arg)
  return out + ([f'--stages={stage}'] if stage else [])


def host_gpus() -> list:
  """The host's GPUs as CUDA_VISIBLE_DEVICES names them, else as `nvidia-smi -L` lists
  them (their indices), else none; no JAX backend is started."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return [g for g in visible.split(',') if g.strip()]
  try:
    listed = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True,
                            timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith('GPU ')]


def gpu_groups(gpus, processes: int) -> list:
  """`processes` disjoint groups of `gpus`, one per child, when there are enough of
  them; else [] (the children share every device)."""
  k = len(gpus) // processes
  return [','.join(gpus[i * k:(i + 1) * k]) for i in range(processes)] if k else []


def _tail(path, lines=5):
  with open(path) as f:
    return ''.join(collections.deque(f, lines))


def run(config, workdir: str, argv, processes: int, only=()) -> None:
  """Trains `config`'s unfinished stages (``only``: of those), up to `processes` at a
  time (see the module docstring), then (without ``only``) reports in one more child;
  `argv`: this launch's command line."""
  if '://' in workdir:
    raise ValueError(f'--side_by_side writes each stage\'s log under --workdir: a local '
                     f'folder, not {workdir}.')
  workdir = os.path.abspath(workdir)
  order = stages.chosen_stages(config, only)
  # What a stage uses outside `order` must be finished: its child says so if not.
  needs = {n: stages.needs(config.stages[n]) & set(order) for n in order}
  done = {n for n in order
          if stages.stage_finished(config.stages[n], os.path.join(workdir, n))}
  waiting = [n for n in order if n not in done]
  logs = os.path.join(workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  free = gpu_groups(host_gpus(), processes)  # Those of no running child.
  shared = dict(os.environ)
  if not free:
    shared.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / processes:.3f}')
  logging.info('Side by side: up to %d stages at once, %s.', processes,
               f'on GPUs {" | ".join(free)}' if free else 'sharing the devices')
  running, started, took = {}, time.time(), []

  def stop_all(signum=None, frame=None):
    del frame
    for child, *_ in running.values():
      child.terminate()
    for child, *_ in running.values():
      child.wait()
    if signum is not None:  # Pre-empted: the children saved; so does the next launch.
      sys.exit(cli.PREEMPTED_EXIT)

  previous = signal.signal(signal.SIGTERM, stop_all)
  try:
    while waiting or running:
      for name in [n for n in waiting if needs[n] <= done][:processes - len(running)]:
        waiting.remove(name)
        log = os.path.join(logs, f'{name}.log')
        gpus = free.pop(0) if free else None
        env = dict(shared, **({'CUDA_VISIBLE_DEVICES': gpus} if gpus else {}))
        with open(log, 'w') as out:
          child = subprocess.Popen(child_argv(argv, name), stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
        running[name] = (child, time.time(), log, gpus)
        logging.info('Side by side: %s started (%d running, %d waiting); log: %s', name,
                     len(running), len(waiting), log)
      if not running:
        raise StageFailed(f'Stages {", ".join(waiting)} wait on each other (their '
                          "'stage:' references make a cycle).")
      time.sleep(1)
      for name, (child, since, log, gpus) in list(running.items()):
        if child.poll() is None:
          continue
        del running[name]
        if gpus:
          free.append(gpus)
        if child.returncode:
          stop_all()
          raise StageFailed(f'Stage {name} failed (exit {child.returncode}); the others '
                            f'were stopped and resume next time. {log} ends:\n{_tail(log)}')
        done.add(name)
        took.append(time.time() - since)
        left = len(waiting) + len(running)
        eta = sum(took) / len(took) * left / processes
        logging.info('Side by side: %s done in %.1f min; %d of %d stages done, ETA of the '
                     'rest ~%.0f min (%.1f min so far).', name, took[-1] / 60, len(done),
                     len(order), eta / 60, (time.time() - started) / 60)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if 'report' in config and not only:
    logging.info('Side by side: every stage is finished; reporting.')
    report = subprocess.run(child_argv(argv), check=False)  # The whole device again.
    if report.returncode:
      raise StageFailed(f'The report failed (exit {report.returncode}).')
