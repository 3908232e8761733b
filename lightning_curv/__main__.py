"""Entry point for ``python -m lightning_curv``."""

from lightning_curv.cli import main

if __name__ == "__main__":
    main()
