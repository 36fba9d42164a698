"""``python -m convlens``: the same as the ``convlens`` command."""

from convlens.cli import main

if __name__ == "__main__":
    main(prog_name="convlens")
