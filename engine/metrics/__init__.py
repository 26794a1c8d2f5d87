"""Training throughput metrics: model FLOPs per iteration (`flops`, pure arithmetic, no torch),
device peaks and MFU (`peak`), measured memory (`memory`). Import from the submodules, so the
planner loads `flops` without torch."""
