"""Planning a pod run before it starts: accelerator topologies, and the real train step compiled
ahead of time for them (memory per chip, FLOPs, roofline step time)."""
