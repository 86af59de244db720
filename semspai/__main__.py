"""`python -m semspai` is the `semspai` command."""

from semspai.stages.cli import main

if __name__ == "__main__":
    main()
