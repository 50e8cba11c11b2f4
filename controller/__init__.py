"""Kubernetes side: turns API objects (from YAML or watches) into policy inputs."""
