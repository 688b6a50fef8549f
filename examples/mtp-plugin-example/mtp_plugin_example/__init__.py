"""Example plugins for mtp-plugins; each is registered by an entry point in this package's pyproject."""
