"""What the command-line tools share."""
import sys

from absl import app
from absl import flags


def main_with_errors(main):
  """Runs a CLI main; a user error (missing file, bad value) ends the program
  with its one-line message instead of a traceback."""
  def wrapped(argv):
    try:
      main(argv)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'Error: {e}')
  return wrapped


def run(module_name: str, main, **kwargs) -> None:
  """`app.run(main)` for a tool started as `python -m <module>` or as its console
  script: either way --help shows the module's docstring and its own flags (absl
  shows those of __main__, which for a console script is the pip-generated stub)."""
  module = sys.modules[module_name]
  stub = sys.modules['__main__']
  if stub is not module:
    stub.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, **kwargs)
