"""``python -m clipsearch``: the same as the ``clipsearch`` command."""

from clipsearch.cli import main

if __name__ == "__main__":
    main()
