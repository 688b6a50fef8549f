"""The `mtp-train` application (Typer CLI, config, data, training loop). Depends on mtp_plugins, never the reverse."""
