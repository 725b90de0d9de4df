"""Deployment: Kubernetes and compose files, the Dockerfile, the install, replicas behind a real nginx."""
