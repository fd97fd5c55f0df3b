"""The swarm: jobs split into subtasks, run by sandboxed workers, with a shared ReasoningBank."""
