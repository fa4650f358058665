"""Tasks as a registry: see base.py."""
from longctx.tasks.base import TASKS, Task, get_task, register

__all__ = ["TASKS", "Task", "get_task", "register"]
