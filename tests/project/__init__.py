"""The project's own rules: layer contracts, types, stubs, generated docs, the README, stated limits, the bench."""
