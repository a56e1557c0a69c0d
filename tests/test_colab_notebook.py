"""launch/colab_quickstart.ipynb runs headless, top to bottom, at the 'smoke' size: the
quickstart trains and reports, the trained hypernetwork draws a new context image and
its predicted LoRA exports as a file the repository's loader reads back."""
import os

import nbclient
import nbformat
import pytest

from hyperlora_jax import cli
from hyperlora_jax.convert import lora_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab_quickstart.ipynb')


def _cell(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'one cell tagged {tag!r} expected, found {len(cells)}'
  return cells[0]


def _has_image(cell):
  return any('image/png' in out.get('data', {}) for out in cell.outputs)


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_notebook_runs_the_smoke_quickstart(tmp_path, monkeypatch):
  workdir = tmp_path / 'workdir'
  # The kernel inherits this process's environment.
  monkeypatch.setenv('HYPERLORA_NOTEBOOK_SIZE', 'smoke')
  monkeypatch.setenv('HYPERLORA_NOTEBOOK_WORKDIR', str(workdir))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  # XLA's CPU compiles dominate this run (each stage, eval row and the sampler compile
  # once): the suite's cheapest compile (cli.FAST_COMPILE_XLA_FLAGS), the programs being
  # too small for their speed to matter.
  monkeypatch.setenv('XLA_FLAGS', cli.FAST_COMPILE_XLA_FLAGS)
  # The notebook's compilation cache (~/.cache by default) stays in this test's folder;
  # every program goes in it (tests/conftest.py's 0 s minimum, inherited), so a report
  # row or restore that builds one again reads it.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'xla_cache'))
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()

  assert "SIZE='smoke'" in ''.join(o.get('text', '') for o in _cell(nb, 'parameters').outputs)
  report = workdir / 'report'
  table = (report / 'results.md').read_text()
  for row in ('no LoRA', 'hyperlora_heads', 'oracle'):
    assert row in table
  assert (report / 'grid.png').stat().st_size > 0
  assert any((tmp_path / 'xla_cache').iterdir())  # not ~/.cache
  assert _has_image(_cell(nb, 'report'))
  # The new context's images, shown beside the context.
  assert _has_image(_cell(nb, 'generate'))
  assert (workdir / 'new_context.png').stat().st_size > 0
  lora = lora_files.load_lora_file(str(workdir / 'new_context_lora.safetensors'))
  assert lora and all(f['down'].size and f['up'].size for f in lora.values())
  printed = ''.join(o.get('text', '') for o in _cell(nb, 'export').outputs)
  assert f'{len(lora)} LoRA targets' in printed
