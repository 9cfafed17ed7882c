"""Building blocks of the LatentDAPS sampler: operator, schedules, MCMC, models."""
