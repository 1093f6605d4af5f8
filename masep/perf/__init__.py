"""Performance: hardware profiles, cost model, simulator, planner, benchmarks."""
