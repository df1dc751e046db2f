"""Policy scripts: the operator's Python that turns a snapshot of the box into intents.

``api`` is what scripts import (pure data); ``runner`` loads and runs them in worker
processes (an edge: it spawns processes). This package file imports neither, so that a
worker process, which imports ``gpud.policies.api``, starts without loading the runner.
"""
