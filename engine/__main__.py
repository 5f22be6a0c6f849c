"""`python -m engine`: the `edlight` command, for an environment whose scripts folder is not on PATH."""

from engine.cli import main

if __name__ == "__main__":  # not on import (a walk over the package's modules imports this one too)
    main()
