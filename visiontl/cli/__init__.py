"""The ``visiontl`` command: one module per group of subcommands, light enough to print help without torch."""
