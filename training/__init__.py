"""Head trainers, data generation and the reference-model recipe; installed as `specdec.training`."""
