"""`python -m llfarm` = the `llfarm` command (how `run --detach` starts its background process)."""
from .cli import main

main()
