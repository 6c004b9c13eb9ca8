"""Where real work runs: worker processes behind ZeroMQ (frames and workers; never simulated time)."""
