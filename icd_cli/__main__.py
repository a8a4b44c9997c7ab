"""`python -m icd_cli ...` is the `icd` console script."""

from icd_cli.main import main

if __name__ == "__main__":
    main()
