"""Mixture-of-Experts layer: router (router.py), capacity dropping (assignment.py), aux/z
losses (aux_loss.py), grouped experts (experts.py), token dispatchers (dispatcher_*.py) over
the collectives in comm.py, the layer (layer.py), sharding (parallelize.py) and metrics
(tracking.py)."""
