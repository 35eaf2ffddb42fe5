"""The command line: every verb (argparse and a thin call into the rooms below).

``main`` (``detloop.cli.main``) loads the verb modules; they share ``detloop.cli.common``.
Nothing outside this package imports it.
"""
