"""python -m numprotect.core.doctor: see numprotect.core.doctor.cli."""

from numprotect.core.doctor.cli import main

if __name__ == "__main__":
    main()
