"""main --side_by_side: stages scheduled over child processes in the order their
'stage:' references allow, a failure stopping the others (a real run side by side:
benchmarks/side_by_side.py --tiny, tests/test_benchmark_smoke.py)."""
import json
import os
import sys
import time

import pytest

from hyperlora_jax import side_by_side
from tests import test_stages


def test_child_argv_drops_the_scheduling_flags_and_names_one_stage():
  argv = ['hyperlora-train', '--config=c.py:gpu', '--side_by_side', '3', '--workdir=w',
          '--stages=a,b', '--config.seed=1', '--side_by_side=2']
  assert side_by_side.child_argv(argv, 'base') == [
      sys.executable, '-m', 'hyperlora_jax.main', '--config=c.py:gpu', '--workdir=w',
      '--config.seed=1', '--stages=base']
  assert side_by_side.child_argv(argv)[-1] == '--config.seed=1'  # The report's launch.


def _fake_children(monkeypatch, tmp_path, scripts):
  """Children that run `scripts[stage]` (Python) and record when they start and end."""
  events = tmp_path / 'events'

  def argv(_, stage=None):
    code = (f'import json, time; open({str(events)!r}, "a").write(json.dumps(['
            f'{stage!r}, "start", time.time()]) + "\\n"); {scripts.get(stage, "pass")}; '
            f'open({str(events)!r}, "a").write(json.dumps([{stage!r}, "end", '
            'time.time()]) + "\\n")')
    return [sys.executable, '-c', code]
  monkeypatch.setattr(side_by_side, 'child_argv', argv)

  def read():
    with open(events) as f:
      return [json.loads(line) for line in f]
  return read


def test_stages_start_when_what_they_use_is_finished(monkeypatch, tmp_path):
  events = _fake_children(monkeypatch, tmp_path, {'base': 'time.sleep(1)',
                                                  'single_lora': 'time.sleep(1)',
                                                  'hyperlora_heads': 'time.sleep(1)'})
  side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'w'), [], processes=2)
  times = {(stage, what): t for stage, what, t in events()}
  # Both use the base: they start after it ends, together, and the report comes last.
  assert times['single_lora', 'start'] > times['base', 'end']
  assert times['hyperlora_heads', 'start'] > times['base', 'end']
  assert abs(times['single_lora', 'start'] - times['hyperlora_heads', 'start']) < 0.9
  assert times[None, 'start'] > max(times['single_lora', 'end'],
                                    times['hyperlora_heads', 'end'])
  assert os.path.exists(tmp_path / 'w' / 'logs' / 'single_lora.log')


def test_named_stages_alone_and_no_report(monkeypatch, tmp_path):
  events = _fake_children(monkeypatch, tmp_path, {})
  side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'w'), [], processes=2,
                   only=('single_lora', 'hyperlora_heads'))
  assert sorted(stage for stage, what, _ in events() if what == 'end') == [
      'hyperlora_heads', 'single_lora']
  with pytest.raises(ValueError, match='No stage nope in this config'):
    side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'w'), [], 2, ('nope',))


def test_a_failed_stage_stops_the_others_and_names_its_log(monkeypatch, tmp_path):
  _fake_children(monkeypatch, tmp_path, {
      'single_lora': 'print("Error: a bad batch"); raise SystemExit(3)',
      'hyperlora_heads': 'time.sleep(60)'})
  started = time.time()
  with pytest.raises(side_by_side.StageFailed,
                     match=r'(?s)Stage single_lora failed \(exit 3\).*logs/single_lora.log'
                           r' ends:\nError: a bad batch'):
    side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'w'), [], processes=2)
  assert time.time() - started < 30  # The sleeping stage was stopped, not waited for.


def test_children_get_their_own_gpus_when_the_host_has_enough(monkeypatch, tmp_path):
  record = ('import os; print(json.dumps([os.environ.get("CUDA_VISIBLE_DEVICES"), '
            'os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")]))')
  slow = f'{record}; time.sleep(1)'
  _fake_children(monkeypatch, tmp_path, {'base': record, 'single_lora': slow,
                                         'hyperlora_heads': slow})
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  seen = lambda w, stage: json.loads((tmp_path / w / 'logs' / f'{stage}.log').read_text())
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3,5,7,9')
  side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'w'), [], processes=2)
  # Two at once on a host of four GPUs: two each, never the same two.
  assert {seen('w', s)[0] for s in ('single_lora', 'hyperlora_heads')} == {'3,5', '7,9'}
  assert seen('w', 'base') == ['3,5', None]  # The whole memory of its own GPUs.
  # Fewer GPUs than stages at once: they share the one, each with part of its memory.
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0')
  side_by_side.run(test_stages._tiny_stages(), str(tmp_path / 'v'), [], processes=2)
  assert seen('v', 'single_lora') == ['0', '0.450']
  assert side_by_side.gpu_groups(['0', '1', '2'], 2) == ['0', '1']
  assert side_by_side.gpu_groups([], 2) == []
