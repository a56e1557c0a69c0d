"""What the command-line tools share."""
import sys


def main_with_errors(main):
  """Runs a CLI main; a user error (missing file, bad value) ends the program
  with its one-line message instead of a traceback."""
  def wrapped(argv):
    try:
      main(argv)
    except (FileNotFoundError, ValueError) as e:
      sys.exit(f'Error: {e}')
  return wrapped
