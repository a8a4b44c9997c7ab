"""`python -m icd_core ...` runs the local CLI (train, eval, shapes make)."""

from icd_core.cli import main

if __name__ == "__main__":
    main()
