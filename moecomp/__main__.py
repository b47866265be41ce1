"""`python -m moecomp ...` is the `moecomp` command."""

from moecomp.cli import main

main()
