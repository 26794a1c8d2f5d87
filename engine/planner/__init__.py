"""Planning without running: the memory model (`memory`), the device table (`devices`) and
the folding planner's cost model and search.

Pure arithmetic on the engine's configs (no torch at import), so `foldmoe validate` and
`foldmoe plan` answer in well under a second.
"""
