"""The engine core: interfaces, hook specifications, registry, configuration, models and the CLI."""
