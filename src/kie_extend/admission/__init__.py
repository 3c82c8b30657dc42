"""Who goes next: fair ready queues, the global gates (pauses, in-flight cap, rate), the provider
breaker and reachability, and the tick that beat runs to hand due work to workers."""
