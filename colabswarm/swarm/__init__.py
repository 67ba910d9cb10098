"""The controller: many workers as one swarm."""
