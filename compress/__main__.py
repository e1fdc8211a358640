"""`python -m compress ...` is the `compress` command; launchers need the module form:
`torchrun --nproc-per-node N -m compress run RECIPE` (compress.dist)."""
from cli import main

if __name__ == "__main__":
    main()
