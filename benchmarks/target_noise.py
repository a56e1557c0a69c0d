r"""How much of a pre-optimization's target weights a hypernetwork can learn (issue 16).

  python benchmarks/target_noise.py --targets=W/targets [--again=W2/targets]

Over the identities of a target-weights folder (a finished lora_bank stage) of the
synthetic task, prints:

* the targets' variance about their mean target (what beta * ||theta_hat - theta*||^2
  costs a hypernetwork that predicts the mean)
* the share of it that a map linear in each identity's attributes (shape, color,
  pattern, second color: what its images show) explains on held-out identities (R^2,
  least squares on a seeded 80 / 20 split)
* with --again, a second fit of the same identities from the same start with other
  noise draws (e.g. another bank.subjects_per_step): the correlation of the two fits'
  deviations from their means, the share of the targets that is not fit noise
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hyperlora_jax import lora as lora_lib  # noqa: E402
from hyperlora_jax.convert import target_weights  # noqa: E402
from hyperlora_jax.data import synthetic  # noqa: E402


def load(folder: str, identities=None):
  """(identities, [N, numbers]): every identity's raw target numbers, flattened."""
  index = target_weights.read_index(folder)
  identities = sorted(index['identities']) if identities is None else identities
  groups = target_weights.load(folder, identities, index['parameterization'],
                               [lora_lib.Target(*t) for t in index['targets']])
  return identities, np.concatenate([g.reshape(len(identities), -1) for g in groups], 1)


def attributes(identities) -> np.ndarray:
  """One-hot shape, color, pattern and second color (and a constant) per identity."""
  of = {synthetic.item_phrase(*i): i for i in synthetic.identities()}
  sizes = (len(synthetic.SHAPES), len(synthetic.COLORS), len(synthetic.PATTERNS),
           len(synthetic.COLORS) + 1)  # the second color: none (-1) is the last
  out = np.zeros((len(identities), sum(sizes) + 1))
  for n, key in enumerate(identities):
    offset = 0
    for value, size in zip(of[key], sizes):
      out[n, offset + value % size] = 1
      offset += size
  out[:, -1] = 1
  return out


def attribute_r2(identities, y: np.ndarray, seed: int = 0) -> float:
  x = attributes(identities)
  order = np.random.default_rng(seed).permutation(len(y))
  fit, held = order[:int(0.8 * len(y))], order[int(0.8 * len(y)):]
  w = np.linalg.lstsq(x[fit], y[fit], rcond=None)[0]
  residual = np.mean((y[held] - x[held] @ w) ** 2)
  return float(1 - residual / np.mean((y[held] - y[fit].mean(0)) ** 2))


def retest(a: np.ndarray, b: np.ndarray) -> float:
  """The correlation of two fits' deviations from their own mean targets."""
  a, b = a - a.mean(0), b - b.mean(0)
  return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def report(folder: str, again: str | None = None) -> dict:
  identities, y = load(folder)
  out = {'identities': len(identities), 'numbers': y.shape[1],
         'variance': float(np.mean((y - y.mean(0)) ** 2)),
         'attribute_r2': attribute_r2(identities, y)}
  if again:
    out['retest'] = retest(y, load(again, identities)[1])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--targets', required=True, help='A target-weights folder.')
  p.add_argument('--again', default=None, help='A second fit of the same identities.')
  args = p.parse_args(argv)
  r = report(args.targets, args.again)
  print(f"{r['identities']} identities x {r['numbers']} numbers: variance about the mean "
        f"target {r['variance']:.4f}, held-out R^2 of an attribute-linear map "
        f"{r['attribute_r2']:.3f}" + (f", correlation with the second fit's deviations "
                                      f"{r['retest']:.3f}" if 'retest' in r else ''))


if __name__ == '__main__':
  main()
