from fastppo.cli import entry

entry()
