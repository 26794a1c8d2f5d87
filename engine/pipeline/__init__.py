"""Pipeline parallelism: layer split (`split`), schedules as action lists (`schedules`), their
verification (`verify`), p2p (`comm`), the executor (`executor`) and the bubble (`bubble`).
Import from the submodules: the pure-Python ones load without torch for the config layer and
the planner."""
