"""Package data: run configs (YAML), model registries (JSON), prompt banks."""
