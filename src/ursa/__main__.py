"""`python -m ursa` runs the CLI (also what `torchrun -m ursa` starts)."""

from ursa.cli import main

if __name__ == "__main__":
    main()
