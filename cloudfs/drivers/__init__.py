"""Compute drivers: the backends that run the processes' VMs."""
