"""Packaged YAML configs: `default.yaml` (CPU, builtin task) and real-run configs for GPU clusters."""
