"""Deployment files (nginx, docker-compose) and the local cluster launcher (:mod:`deploy.local_cluster`).

Imports nothing from the gateway: it runs the gateway as separate processes.
"""
