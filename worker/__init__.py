"""The attribution worker: RQ jobs around the Forward-INF engine (`worker.forward_inf`)."""
