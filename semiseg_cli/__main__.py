"""`python -m semiseg_cli` and `torchrun -m semiseg_cli` enter here."""

from semiseg_cli.cli import main

if __name__ == "__main__":
    main()
