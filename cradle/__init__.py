"""The ``cradle`` command line and the demo: the one package that knows every other.

Nothing imports it (an import-linter contract says so); each sub-command's implementation lives in
the package whose part of the node it drives.
"""
